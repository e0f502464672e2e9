"""Settings: the machinery (`settings`: one dataclass field per setting gives its flag, YAML key and recorded
key) and every stage's settings (`stages`: TrainConfig, GenerateConfig, EvaluateConfig, RunConfig and the
downstream models' DownstreamSettings), and the sampling settings they share (`sampling`: SamplingConfig). Imports no torch, so `defectfill --help` is quick."""

from defectfill.config.sampling import SamplingConfig
from defectfill.config.settings import Settings
from defectfill.config.stages import DownstreamSettings, EvaluateConfig, GenerateConfig, RunConfig, TrainConfig
from defectfill.core.lazy import lazy_getattr

__all__ = ["DownstreamSettings", "EvaluateConfig", "GenerateConfig", "RunConfig", "SamplingConfig", "Settings", "TrainConfig"]

# the other names of the old module defectfill/config.py (now defectfill.config.stages), with a warning
__getattr__ = lazy_getattr(__name__, {}, deprecated=("defectfill.config.stages",))
