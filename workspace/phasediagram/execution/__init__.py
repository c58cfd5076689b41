"""Running the study's jobs: in process, in a local pool, as bash or Slurm scripts, through submitit."""
