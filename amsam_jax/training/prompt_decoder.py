"""The trainable half of SAM: prompt encoder and mask decoder over cached image embeddings."""

from flax import nnx

from amsam_jax.modeling.sam import Sam


class PromptDecoder(nnx.Module):
    """The parts of SAM a training step runs: prompt encoder and mask decoder (shared, not copied).

    The image encoder is frozen and its outputs are cached (docs/fewshot.md §5.7), so steps never
    see it.
    """

    def __init__(self, sam: Sam):
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
