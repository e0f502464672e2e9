"""What defectfill writes, one module per folder tree: the training run folder (`run_folder`), its checkpoints
(`checkpoints`), the generated dataset (`generated`) and the HTML/Markdown reports (`report`). The `run` job
folder's layout is `config.stages.RunConfig.folders`."""
