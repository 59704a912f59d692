"""What every training module (SRT / RFT, Phase 2, GRPO) shares around its own algorithm: where its policy came
from, the divergence guard, and where a resumed run exports (docs/robustness.md)."""

from __future__ import annotations

from sdzero_pl.core.guard import guard_callbacks
from sdzero_pl.core.models import EXPORT_KEY, export_path


class TrainingHooks:
    """Mixed into a LightningModule (before ``L.LightningModule``) whose hyperparameters hold
    ``model_name_or_path`` and ``export_dir``; it sets ``self.resumed_export`` from a resumed checkpoint."""

    resumed_export: str | None = None  # where the run this one resumes exports (from its checkpoint)

    @property
    def start_model(self) -> str:
        return self.hparams.model_name_or_path

    def configure_callbacks(self) -> list:
        return guard_callbacks(self)  # non-finite loss / gradients / weights stop training, nothing is exported

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[EXPORT_KEY] = export_path(self.trainer, self.hparams.export_dir, self.resumed_export)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.resumed_export = checkpoint.get(EXPORT_KEY)
