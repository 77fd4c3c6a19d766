"""Training: `trainer.train(cfg)` and the modules it reads from, one job each: `config` (RunConfig),
`distributed` (process group), `engine` (DeepSpeed config, model, optimizer, compile), `schedule`, `batches`
(data position), `signals`, `progress` (metrics between logging points), `evaluate`, `resume` and
`checkpoint` (checkpoints), `run_log` and `tracking` (records), `mlflow_model`, `system_metrics`, `export`.

It may import `mutransfer.models`, `mutransfer.data` and the leaf modules (`errors`, `typed_config`, `tags`,
`netutil`), never `mutransfer.launch` or `mutransfer.study`."""
