"""What defectfill writes, one module per folder tree, each opening with its tree diagram: the training run folder
(`run_folder`), its checkpoints (`checkpoints`), the generated dataset (`generated`), the `run` job folder
(`job_folder`), and the evaluation folder and reports (`report`)."""
