"""SAM prompt encoder. Port of segment_anything/modeling/prompt_encoder.py (Apache-2.0)."""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from amsam_jax.modeling.common import Buffer, LayerNorm2d, gelu


class Embedding(nnx.Module):
    """A learned table, stored as torch's `nn.Embedding.weight` (num, dim)."""

    def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (num_embeddings, features)))


class TaskParam(nnx.Param):
    """A task-prompt embedding (docs/sum.md §4): its own Variable type, so optimisers and
    partitions select it by type."""


class TaskEmbedding(nnx.Module):
    """One zero-initialised task-prompt row, stored as the SUM reference's `nn.Embedding(1, C)`."""

    def __init__(self, features: int):
        self.weight = TaskParam(jnp.zeros((1, features), jnp.float32))


TASKS = ("unspecified", "salient", "entity", "part")


def task_id(task: "int | str | None") -> int | None:
    """Task name or id -> id (0 unspecified, 1 salient, 2 entity, 3 part); None stays None."""
    if task is None or isinstance(task, int):
        if task is not None and not 0 <= task < len(TASKS):
            raise ValueError(f"task id {task} out of range 0..{len(TASKS) - 1}")
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (one of {', '.join(TASKS)})")
    return TASKS.index(task)


class PositionEmbeddingRandom(nnx.Module):
    """Random-Fourier positional encoding with a fixed Gaussian matrix (loaded, never re-drawn)."""

    def __init__(self, num_pos_feats: int = 64, *, rngs: nnx.Rngs):
        self.positional_encoding_gaussian_matrix = Buffer(
            jax.random.normal(rngs.params(), (2, num_pos_feats), jnp.float32)
        )

    def _pe_encoding(self, coords: jax.Array) -> jax.Array:
        """Encodes points normalised to [0, 1]: (..., 2) -> (..., 2 * num_pos_feats)."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix[...]
        coords = 2 * math.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def __call__(self, size: tuple[int, int]) -> Float[Array, "h w c"]:
        """Dense positional encoding of an (H, W) grid, channels-last."""
        h, w = size
        # Same float32 arithmetic as the reference (cumsum of ones, minus 0.5, divided by size).
        y_embed = (jnp.arange(1, h + 1, dtype=jnp.float32) - 0.5) / h
        x_embed = (jnp.arange(1, w + 1, dtype=jnp.float32) - 0.5) / w
        grid = jnp.stack(jnp.broadcast_arrays(x_embed[None, :], y_embed[:, None]), axis=-1)
        return self._pe_encoding(grid)  # (H, W, C)

    def forward_with_coords(
        self, coords_input: Float[Array, "b n 2"], image_size: tuple[int, int]
    ) -> Float[Array, "b n c"]:
        """Encodes unnormalised (x, y) pixel coordinates of an image of size (H, W)."""
        coords = coords_input / jnp.asarray([image_size[1], image_size[0]], jnp.float32)
        return self._pe_encoding(coords.astype(jnp.float32))


class PromptEncoder(nnx.Module):
    """Encodes points, boxes and masks into sparse (B, N, C) and dense (B, G, G, C) embeddings."""

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        num_tasks: int = len(TASKS),
        freeze_task0: bool = True,
        *,
        rngs: nnx.Rngs,
    ):
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2, rngs=rngs)
        # pos/neg point + 2 box corners
        self.point_embeddings = nnx.List([Embedding(1, embed_dim, rngs=rngs) for _ in range(4)])
        self.not_a_point_embed = Embedding(1, embed_dim, rngs=rngs)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        # Torch Sequential indices 0, 1, 3, 4, 6 (2 and 5 are the GELUs).
        self.mask_downscaling = nnx.List(
            [
                nnx.Conv(1, mask_in_chans // 4, (2, 2), strides=(2, 2), padding="VALID", rngs=rngs),
                LayerNorm2d(mask_in_chans // 4, rngs=rngs),
                nnx.Conv(
                    mask_in_chans // 4,
                    mask_in_chans,
                    (2, 2),
                    strides=(2, 2),
                    padding="VALID",
                    rngs=rngs,
                ),
                LayerNorm2d(mask_in_chans, rngs=rngs),
                nnx.Conv(mask_in_chans, embed_dim, (1, 1), rngs=rngs),
            ]
        )
        self.no_mask_embed = Embedding(1, embed_dim, rngs=rngs)
        # SUM task prompt (docs/sum.md §4), zero-initialised; absent from official SAM checkpoints.
        self.freeze_task0 = freeze_task0
        self.task_prompt_embedding = nnx.List([TaskEmbedding(embed_dim) for _ in range(num_tasks)])

    def task_embeddings(self) -> Float[Array, "t c"]:
        """The (T, C) task table; row 0 reads as zero (no gradient) when `freeze_task0`."""
        table = jnp.concatenate([e.weight[...] for e in self.task_prompt_embedding], axis=0)
        if self.freeze_task0:
            table = jnp.where(jnp.arange(table.shape[0])[:, None] == 0, 0.0, table)
        return table

    def get_dense_pe(self) -> Float[Array, "g g c"]:
        """Positional encoding of the image-embedding grid, (G, G, C)."""
        return self.pe_layer(self.image_embedding_size)

    def _embed_points(
        self, points: jax.Array, labels: jax.Array, pad: bool
    ) -> Float[Array, "b n c"]:
        points = points + 0.5  # shift to the pixel centre
        if pad:
            points = jnp.concatenate([points, jnp.zeros((points.shape[0], 1, 2))], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((labels.shape[0], 1), labels.dtype)], 1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        lab = labels[..., None]
        emb = jnp.where(lab == -1, 0.0, emb)
        emb = emb + jnp.where(lab == -1, self.not_a_point_embed.weight[...], 0.0)
        emb = emb + jnp.where(lab == 0, self.point_embeddings[0].weight[...], 0.0)
        emb = emb + jnp.where(lab == 1, self.point_embeddings[1].weight[...], 0.0)
        return emb

    def _embed_boxes(self, boxes: jax.Array) -> Float[Array, "b 2 c"]:
        boxes = boxes + 0.5  # shift to the pixel centre
        coords = boxes.reshape(-1, 2, 2)  # (B, 2 corners, xy)
        emb = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        corner_types = jnp.concatenate(
            [self.point_embeddings[2].weight[...], self.point_embeddings[3].weight[...]], axis=0
        )  # (2, C)
        return emb + corner_types

    def _embed_masks(self, masks: Float[Array, "b h w 1"]) -> Float[Array, "b g g c"]:
        x = masks
        for i, layer in enumerate(self.mask_downscaling):
            x = layer(x)
            if i in (1, 3):
                x = gelu(x)
        return x

    def __call__(
        self,
        points: tuple[jax.Array, jax.Array] | None,
        boxes: Float[Array, "b 4"] | None,
        masks: Float[Array, "b h w 1"] | None,
        task: jax.Array | int | None = None,
    ) -> tuple[Float[Array, "b n c"], Float[Array, "b g g c"]]:
        """Embeds prompts.

        Args:
            points: (coords (B, N, 2) in input-frame pixels (x, y), labels (B, N) with 1 positive,
                0 negative, -1 padding), or None.
            boxes: (B, 4) boxes (x0, y0, x1, y1) in input-frame pixels, or None.
            masks: (B, 4G, 4G, 1) low-resolution mask logits, or None.
            task: SUM task id, a scalar or one per prompt (B,); its row of the task table is
                added to the dense embedding. None adds nothing (plain SAM).

        Returns:
            sparse (B, N, C) and dense (B, G, G, C) embeddings.
        """
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        sparse = jnp.zeros((bs, 0, self.embed_dim), jnp.float32)
        if points is not None:
            coords, labels = points
            sparse = jnp.concatenate(
                [sparse, self._embed_points(coords, labels, pad=boxes is None)], axis=1
            )
        if boxes is not None:
            sparse = jnp.concatenate([sparse, self._embed_boxes(boxes)], axis=1)
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            g_h, g_w = self.image_embedding_size
            dense = jnp.broadcast_to(
                self.no_mask_embed.weight[...].reshape(1, 1, 1, -1), (bs, g_h, g_w, self.embed_dim)
            )
        if task is not None and len(self.task_prompt_embedding):
            rows = jnp.take(self.task_embeddings(), jnp.asarray(task, jnp.int32), axis=0)
            dense = dense + jnp.broadcast_to(rows, (bs, self.embed_dim))[:, None, None, :]
        return sparse, dense
