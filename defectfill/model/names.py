"""Names of the model side that settings and folder readers need without loading torch: the default base, the
bases shipped in the package, and the weight files a run folder holds (diffusers' and textual inversion's names)."""

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-inpainting"
# Bases shipped inside the package (made by `defectfill pretrain-base`; see README "defectfill-mini").
BUILTIN_MODELS = ("defectfill-mini",)
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TOKEN_WEIGHTS_NAME = "learned_embeds.safetensors"
