"""Golden fixtures: official segment-anything outputs of small random SAMs, for torch-free tests.

    python -m weights_conversion.make_golden [--out tests/golden]

Builds the official PyTorch SAM (segment_anything 1.0's modeling code and SamPredictor) at small
configurations, gives every tensor a random value, runs it and writes one npz per fixture
(`FIXTURES`), like bonsai's mamba2 `generate_golden_logits.py`. Keys:

    sd/<official key>    the official state dict, float32 (official key names)
    in/<case>/<name>     inputs of one call
    out/<case>/<name>    the official outputs of that call
    meta/config_json     the SamConfig (`dataclasses.asdict`) as JSON
    meta/versions        JSON: torch, torchvision, segment-anything, pillow
    meta/seed            the seed of the weights and inputs

Cases are named after the module they call: `image_encoder.blocks.<i>`, `image_encoder`,
`prompt_encoder.<prompt>`, `prompt_encoder.get_dense_pe`, `mask_decoder`, `predictor` (set_image)
and `predictor.<prompt>` (predict). Arrays are channels-last as in amsam_jax (NCHW tensors of the
reference are transposed here); masks, IoU and logits keep the reference's (B, K, ...) layout.

Weights and inputs are N(mean, std^2) values rounded to a power-of-two grid of std / 8 to std / 4
(the encoder's input image: random signs): as random as tests/sam_reference.py's `randomize_`,
but with few mantissa bits, so the npz compresses ~4x and a fixture stays under 1 MB. The predictor
runs on a synthetic uint8 image of non-square size. Re-running gives bitwise-identical arrays on
the same torch build and CPU (one torch thread; zip timestamps differ: compare arrays, not bytes).
"""

import argparse
import dataclasses
import importlib.metadata
import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.predictor import SamPredictor

from amsam_jax.build_sam import SamConfig

SEED = 0
DEFAULT_OUT = Path("tests/golden")


@dataclasses.dataclass(frozen=True)
class Fixture:
    """One golden file: a configuration and whether it stores the per-module cases."""

    cfg: SamConfig
    modules: bool  # blocks, prompt encoder and mask decoder cases (else encoder + predictor only)
    image_hw: tuple[int, int]  # size of the synthetic predictor image


FIXTURES = {
    # 256 px, grid 16, window 14: windowed block 0 pads 16 -> 28; block 1 is global.
    "sam_tiny": Fixture(SamConfig.tiny(), modules=True, image_hw=(150, 230)),
    # 320 px, grid 20 (padded 20 -> 28 by window 14), three blocks of which two are global.
    "sam_tiny_320": Fixture(
        SamConfig.tiny(image_size=320, encoder_depth=3, encoder_global_attn_indexes=(0, 2)),
        modules=False,
        image_hw=(230, 150),
    ),
}


def build_official(cfg: SamConfig) -> Sam:
    """segment_anything's Sam for `cfg` (the constructor arguments of its build_sam.py)."""
    grid = cfg.grid_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg.encoder_depth,
            embed_dim=cfg.encoder_embed_dim,
            img_size=cfg.image_size,
            mlp_ratio=cfg.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=cfg.encoder_num_heads,
            patch_size=cfg.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=cfg.encoder_global_attn_indexes,
            window_size=cfg.window_size,
            out_chans=cfg.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_embed_dim,
                mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_num_heads,
            ),
            transformer_dim=cfg.prompt_embed_dim,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=list(cfg.pixel_mean),
        pixel_std=list(cfg.pixel_std),
    ).eval()


def grid_normal(
    shape: tuple[int, ...], std: float, g: torch.Generator, mean: float = 0.0
) -> torch.Tensor:
    """`mean + N(0, std^2)` rounded to a power-of-two grid of std / 8 to std / 4 (exact in float32).

    Few mantissa bits: the npz compresses such arrays ~4x, random float32 hardly at all.
    """
    step = 2.0 ** np.floor(np.log2(std / 4))
    z = torch.randn(shape, generator=g, dtype=torch.float64) * std
    return (mean + torch.round(z / step) * step).to(torch.float32)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Gives every tensor a non-trivial random value (tests/sam_reference.py's `randomize_`).

    SAM's own init leaves pos_embed, rel-pos tables and LayerNorms at constants, which would hide
    mapping errors; here every tensor is random at a scale that keeps activations O(1).
    """
    g = torch.Generator().manual_seed(seed)

    def fill(p: torch.Tensor, std: float, mean: float = 0.0) -> None:
        p.copy_(grid_normal(tuple(p.shape), std, g, mean))

    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm | LayerNorm2d):
            fill(module.weight, 0.1, mean=1.0)
            fill(module.bias, 0.1)
        elif isinstance(module, torch.nn.ConvTranspose2d):
            fill(module.weight, module.in_channels**-0.5)
            fill(module.bias, 0.05)
        elif isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            fill(module.weight, module.weight[0].numel() ** -0.5)
            if module.bias is not None:
                fill(module.bias, 0.05)
        elif isinstance(module, torch.nn.Embedding):
            fill(module.weight, 1.0)
    for name, p in model.named_parameters():
        if "rel_pos" in name:
            fill(p, 0.2)
        elif name.endswith("pos_embed"):
            fill(p, 0.1)
    # The Fourier matrix is a buffer: N(0, 1) like the reference's init, on the grid.
    fill(model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix, 1.0)
    return model


def random_signs(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Uniform random values in {-1, 1}: an O(1) "preprocessed image" that compresses to ~2 bits
    per value (a Gaussian image would take a quarter of the 1 MB budget)."""
    return 2 * torch.randint(0, 2, shape, generator=g).to(torch.float32) - 1


def synthetic_image(h: int, w: int) -> np.ndarray:
    """A uint8 (H, W, 3) scene: colour bands with a disc and a rectangle (compresses well)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    bands = np.floor(8 * x / w) / 8, np.floor(6 * y / h) / 6
    img = np.stack([40 + 150 * bands[0], 60 + 120 * bands[1], 90 + 60 * bands[0]], axis=-1)
    disc = (y - 0.55 * h) ** 2 + (x - 0.4 * w) ** 2 < (0.25 * min(h, w)) ** 2
    img[disc] = (220, 60, 50)
    rect = (np.abs(y - 0.3 * h) < 0.12 * h) & (np.abs(x - 0.75 * w) < 0.15 * w)
    img[rect] = (30, 200, 90)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def nhwc(t: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) tensor -> (B, H, W, C) float32 array."""
    return t.permute(0, 2, 3, 1).numpy().astype(np.float32)


def nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) tensor -> (B, C, H, W) tensor."""
    return x.permute(0, 3, 1, 2).contiguous()


def module_cases(
    model: Sam, cfg: SamConfig, g: torch.Generator
) -> Iterator[tuple[str, dict, dict]]:
    """(case, inputs, outputs) of encoder blocks, full encoder, prompt encoder and mask decoder."""
    grid, dim, c = cfg.grid_size, cfg.encoder_embed_dim, cfg.prompt_embed_dim
    windowed = min(set(range(cfg.encoder_depth)) - set(cfg.encoder_global_attn_indexes))
    for i in (windowed, cfg.encoder_global_attn_indexes[0]):
        x = grid_normal((1, grid, grid, dim), 1.0, g)
        y = model.image_encoder.blocks[i](x)  # the official blocks are channels-last already
        yield f"image_encoder.blocks.{i}", {"x": x.numpy()}, {"y": y.numpy()}

    x = random_signs((1, cfg.image_size, cfg.image_size, 3), g)
    yield "image_encoder", {"x": x.numpy()}, {"embedding": nhwc(model.image_encoder(nchw(x)))}

    s = float(cfg.image_size)
    points = torch.round(torch.rand((2, 3, 2), generator=g, dtype=torch.float64) * s * 4) / 4
    labels = torch.tensor([[1, 0, -1], [0, 1, 1]], dtype=torch.int32)  # an explicit padding point
    boxes = torch.tensor([[10.25, 20.5, 100.0, 180.75], [0.0, 0.0, s - 1, s - 1]])
    masks = grid_normal((1, 4 * grid, 4 * grid, 1), 4.0, g)
    prompts = {
        "points": {"coords": points.float(), "labels": labels},  # + the pad point (no box)
        "box": {"boxes": boxes},
        "points_box": {"coords": points[:, :1].float(), "labels": labels[:, :1], "boxes": boxes},
        "mask": {"masks": masks},
    }
    for name, kw in prompts.items():
        point_pair = (kw["coords"], kw["labels"]) if "coords" in kw else None
        sparse, dense = model.prompt_encoder(
            point_pair, kw.get("boxes"), nchw(kw["masks"]) if "masks" in kw else None
        )
        inputs = {k: v.numpy() for k, v in kw.items()}
        yield f"prompt_encoder.{name}", inputs, {"sparse": sparse.numpy(), "dense": nhwc(dense)}
    pe = model.prompt_encoder.get_dense_pe()  # (1, C, G, G)
    yield "prompt_encoder.get_dense_pe", {}, {"dense_pe": nhwc(pe)[0]}

    # Two prompt rows sharing one image embedding (the reference's repeat_interleave).
    inputs = {
        "image_embeddings": grid_normal((1, grid, grid, c), 1.0, g),
        "image_pe": grid_normal((grid, grid, c), 0.7, g),
        "sparse": grid_normal((2, 3, c), 1.0, g),
        "dense": grid_normal((2, grid, grid, c), 0.5, g),
    }
    outputs = {}
    for tag, multimask in (("multimask", True), ("single", False)):
        low_res, iou = model.mask_decoder(
            image_embeddings=nchw(inputs["image_embeddings"]),
            image_pe=nchw(inputs["image_pe"][None]),
            sparse_prompt_embeddings=inputs["sparse"],
            dense_prompt_embeddings=nchw(inputs["dense"]),
            multimask_output=multimask,
        )
        outputs[f"masks_{tag}"] = low_res.numpy()
        outputs[f"iou_pred_{tag}"] = iou.numpy()
    yield "mask_decoder", {k: v.numpy() for k, v in inputs.items()}, outputs


def predictor_prompts(h: int, w: int, all_prompts: bool) -> dict[str, dict]:
    """SamPredictor.predict keyword arguments, in original-image pixels."""
    box = np.array([0.15 * w, 0.2 * h, 0.8 * w, 0.85 * h]).round()
    mixed = dict(
        point_coords=np.array([[0.4 * w, 0.55 * h], [0.75 * w, 0.3 * h], [0.1 * w, 0.9 * h]]),
        point_labels=np.array([1, 0, 1]),
    )
    mixed["point_coords"] = mixed["point_coords"].round()  # whole pixels, exact in any dtype
    if not all_prompts:
        point = dict(point_coords=mixed["point_coords"][1:2], point_labels=np.array([0]))
        return {"box_and_point": dict(box=box, **point, multimask_output=False)}
    return {
        "box": dict(box=box, multimask_output=True),
        "points_mixed": dict(mixed, multimask_output=True),
    }


def predictor_cases(
    model: Sam, image: np.ndarray, all_prompts: bool
) -> Iterator[tuple[str, dict, dict]]:
    """(case, inputs, outputs) of the official SamPredictor on `image`."""
    predictor = SamPredictor(model)
    predictor.set_image(image)
    embedding = nhwc(predictor.get_image_embedding())
    yield "predictor", {"image": image}, {"embedding": embedding}
    names = ("masks", "iou_predictions", "low_res_logits")
    last = None
    for name, kw in predictor_prompts(*image.shape[:2], all_prompts).items():
        last = predictor.predict(**kw)
        yield f"predictor.{name}", kw, dict(zip(names, last, strict=True))
    if all_prompts:  # the follow-up of the SAM notebook: best mask's logits fed back
        _, iou, low_res = last
        kw = {**kw, "mask_input": low_res[np.argmax(iou)][None], "multimask_output": False}
        yield "predictor.mask_input", kw, dict(zip(names, predictor.predict(**kw), strict=True))


def versions() -> dict[str, str]:
    """Versions of the code that produced the reference outputs (torch with its build tag)."""
    dists = ("torchvision", "segment-anything", "pillow")
    return {"torch": torch.__version__, **{d: importlib.metadata.version(d) for d in dists}}


@torch.no_grad()
def golden_arrays(fixture: Fixture, seed: int = SEED) -> dict[str, np.ndarray]:
    """All arrays of one fixture file (see the module docstring for the keys)."""
    cfg = fixture.cfg
    torch.manual_seed(seed)
    model = randomize_(build_official(cfg), seed)
    arrays = {f"sd/{k}": v.numpy().astype(np.float32) for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    cases = list(predictor_cases(model, synthetic_image(*fixture.image_hw), fixture.modules))
    if fixture.modules:
        cases = list(module_cases(model, cfg, g)) + cases
    else:
        x = random_signs((1, cfg.image_size, cfg.image_size, 3), g)
        embedding = nhwc(model.image_encoder(nchw(x)))
        cases = [("image_encoder", {"x": x.numpy()}, {"embedding": embedding})] + cases
    for case, inputs, outputs in cases:
        for kind, values in (("in", inputs), ("out", outputs)):
            for name, value in values.items():
                arrays[f"{kind}/{case}/{name}"] = np.asarray(value)
    arrays["meta/config_json"] = np.array(json.dumps(dataclasses.asdict(cfg), sort_keys=True))
    arrays["meta/versions"] = np.array(json.dumps(versions(), sort_keys=True))
    arrays["meta/seed"] = np.array(seed)
    return arrays


def make_golden(out_dir: str | Path = DEFAULT_OUT, seed: int = SEED) -> list[Path]:
    """Writes every fixture of `FIXTURES` as `<out_dir>/<name>.npz`.

    Args:
        out_dir: output folder (created).
        seed: seed of the weights and inputs.

    Returns:
        the written paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order: bitwise-reproducible outputs
    try:
        paths = []
        for name, fixture in FIXTURES.items():
            path = out_dir / f"{name}.npz"
            np.savez_compressed(path, **golden_arrays(fixture, seed))
            paths.append(path)
        return paths
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weights_conversion.make_golden",
        description="Write the golden npz fixtures (official segment-anything outputs).",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of weights and inputs")
    args = parser.parse_args(argv)
    for path in make_golden(args.out, args.seed):
        print(f"{path} ({path.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
