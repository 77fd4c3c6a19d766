"""The proxy-to-target workflow: a study's config (`config`), its sweep over proxy shapes (`sweep`), how it
lives in MLflow (`store`), fitted optima and trends (`fit`, `analysis`, `holdout`) computed once per study as
one `StudyAnalysis` (`study_analysis`), plots and tables (`figures`, `report`), the step to the target
(`transfer`), the MLflow UI (`ui`), the CPU demo (`demo`) and their command line (`cli`).

It may import `mutransfer.train`, `mutransfer.launch`, `mutransfer.models`, `mutransfer.data` and the leaf
modules (`errors`, `typed_config`, `tags`, `netutil`); nothing imports it but `mutransfer.cli`.
"""
