"""`defectfill run`: the whole job over every defect type (`runner.run_all`), one type's stages
(`process.process_type`) and the Ray executor (`ray_executor`). The one stage that calls other stages: it
orchestrates train, generate and evaluate."""

from defectfill.core.lazy import lazy_getattr

__getattr__ = lazy_getattr(__name__, {"run_all": "defectfill.run.runner"})
