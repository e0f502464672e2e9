"""The model layer: loading the inpainting pipeline, LoRA and the defect token (`pipeline`), the cross-attention
recorder (`attention`), the canvas an image is sampled and trained on (`canvas`), the offline tiny pipeline and
CLIP tokenizer (`tiny`), the LPIPS network (`lpips`) and the model and weight file names (`names`). Importing
the package imports no torch; its modules do."""

from defectfill.core.lazy import lazy_getattr

__getattr__ = lazy_getattr(__name__, {"load_pipeline": "defectfill.model.pipeline",
                                      "DEFAULT_MODEL": "defectfill.model.names"})
