"""dmlbench: a benchmark harness for parameter-efficient fine-tuning in deep metric learning."""
