"""The teacher shipped with kd (`teacher=pretrained`, `kd evaluate checkpoint=pretrained`):
teacher.pt (a float32 kd checkpoint), teacher.sha256 (its digest, checked on every use),
teacher.json and README.md (the command that trained it, the commit, the machine, its numbers);
all four written by scripts/ship_teacher.py. Installed as the package
kd_cli.pretrained so an installed kd finds it wherever it runs."""
