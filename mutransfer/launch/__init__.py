"""Launching processes: one training run on several nodes (`multinode`), sbatch scripts for a run or a study's
job array (`slurm`), the per-trial `deepspeed` / `torchrun` command of a sweep (`trials`), and `mutransfer
launch` (`cli`).

It may import `mutransfer.train` and the leaf modules (`errors`, `typed_config`, `tags`, `netutil`), never
`mutransfer.study`.
"""
