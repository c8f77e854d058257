"""Weight averaging (SWA, Izmailov et al. 2018): the mean of the weights at the end of each of the
last N epochs, used in place of the last epoch's weights. A dropout net's weights wander around
a wide minimum while the learning rate is still up; their mean sits nearer its centre. The mean of
vectors that each obey max-norm obeys it too, and there is no batch norm to recalibrate."""
import torch


class WeightAverage:
    def __init__(self, model, last_epochs, epochs):
        self.first = max(0, epochs - last_epochs)  # 0-based epoch whose end is averaged first
        self.on = last_epochs > 0
        self.count = 0
        self.mean = {k: torch.zeros_like(v) for k, v in model.state_dict().items()} if self.on else {}

    def after_epoch(self, model, epoch):
        """Fold in the weights at the end of 0-based `epoch`, when it is one of the last N."""
        if not self.on or epoch < self.first:
            return False
        self.count += 1
        with torch.no_grad():
            for k, v in model.state_dict().items():
                self.mean[k] += (v - self.mean[k]) / self.count  # running mean: no sum to overflow
        return True

    def evaluated(self, model, evaluate):
        """evaluate() on the averaged weights, the model's own put back afterwards; keys get _avg."""
        own = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.mean)
        try:
            return {f"{k}_avg": v for k, v in evaluate(model).items()}
        finally:
            model.load_state_dict(own)

    def state(self):
        return {"count": self.count, "mean": self.mean}

    def load(self, state):
        if self.on and state:
            self.count, self.mean = state["count"], state["mean"]
