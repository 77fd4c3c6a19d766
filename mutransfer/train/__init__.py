"""Training: `trainer.train(cfg)` and the modules it reads from, one job each: `config` (RunConfig),
`distributed` (process group), `engine` (DeepSpeed config, model, optimizer groups from `optim`, schedule,
compile), `batches` (data position), `signals`, `progress` (metrics between logging points), `evaluate`,
`resume` and `checkpoint` (checkpoints), `run_log` and `tracking` (records), `export`. It imports from
`mutransfer.models` and `mutransfer.data`, never from `mutransfer.launch`."""
