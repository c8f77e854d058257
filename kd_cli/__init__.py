"""kd: knowledge distillation experiments (Hinton, Vinyals & Dean 2015) from the command line."""
