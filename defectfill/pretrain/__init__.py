"""`defectfill pretrain-base`: pretraining the small inpainting base `defectfill-mini` (`base`) on a drawn
industrial world (`world`)."""
