"""Training: `train` (`trainer`: the DefectFill fine-tune of one defect type, or of one object's types), its
losses (`losses`) and the naive reference step (`naive_step`). The package is callable as `train`:
`defectfill.train(config)`."""

from defectfill.core.lazy import lazy_getattr, make_callable

__all__ = ["train"]

# the old module defectfill/train.py's other names (now defectfill.train.trainer), with a warning
__getattr__ = lazy_getattr(__name__, {"train": "defectfill.train.trainer"}, deprecated=("defectfill.train.trainer",))
make_callable(__name__, "train")
