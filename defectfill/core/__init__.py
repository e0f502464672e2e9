"""The bottom layer every other package may use: the error users see (`errors`), atomic file writes (`atomic`),
folder claims and locks (`folders`), and the helpers behind the packages' lazy names (`lazy`). It imports
nothing else of defectfill.

Seeding. Three stages derive their random streams from the user's seed, each its own way, and each keeps it:
every scheme fixes what its outputs hold for a given seed, so moving one onto another would change every
training draw, every generated image or the built-in base's weights (and existing runs, datasets and
pretraining folders would no longer resume or reproduce):
- training (`train.trainer`): a SHA-256 of (seed, step, micro-batch, process) seeds each micro-batch's
  generator, and of (seed, "epoch", n) each pass over the references; the LoRA's initial weights come from
  the global generator after `accelerate.set_seed(seed)`. No state to checkpoint: a resume redraws exactly.
- generation (`generate.generator.derived_seed`): numpy's SeedSequence([seed, index]) gives item `index` of
  a dataset its seed, and candidate `i` of that item the seed SeedSequence([item seed, i]) (painting several
  defects, defect `i` first gets SeedSequence([item seed, i])), so any item, on any process or shard, is
  drawn alone and the same.
- pretraining (`pretrain.base.step_rngs`): numpy's default_rng([seed, stage, step]) draws the world batch
  and seeds the step's torch generator; the networks' initial weights come from `torch.manual_seed(seed)` in
  a forked global state.
"""
