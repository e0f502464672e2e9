"""Generation: `DefectGenerator` (`generator`: a trained run paints its defect into an image inside a mask, with
Low-Fidelity Selection) and the resumable dataset writer behind `defectfill generate` (`writer.run_generate`;
the folder it writes is `defectfill.outputs.generated`)."""

from defectfill.core.lazy import lazy_getattr

__all__ = ["DefectGenerator", "GenerationResult", "generate_command", "run_generate"]

# the old module defectfill/generate.py's other names, with a warning: now in writer or outputs.generated
__getattr__ = lazy_getattr(
    __name__,
    {"DefectGenerator": "defectfill.generate.generator", "GenerationResult": "defectfill.generate.generator",
     "generate_command": "defectfill.generate.writer", "run_generate": "defectfill.generate.writer"},
    deprecated=("defectfill.generate.writer", "defectfill.outputs.generated"),
    renamed={"_identity": ("defectfill.outputs.generated", "output_identity"),
             "_prepare_output": ("defectfill.outputs.generated", "prepare_output"),
             "_save_png": ("defectfill.outputs.generated", "save_png")},
)
