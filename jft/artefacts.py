"""End-of-run artefacts: PEFT adapters, the merged model, summary.md,
curves.png."""

from __future__ import annotations

import os

from jft import evaluators, init, metrics, sharding
from jft.interop import hf
from jft.interop import peft as peft_format
from jft.state import model_params


def export(
  config, workdir: str, state, model_cfg, tokenizer, primary: bool
) -> None:
  """End-of-run artefacts: LoRA adapters alone and/or the merged model.

  Every process takes part in gathering sharded params; process 0 writes.
  """
  if not (
    model_cfg.peft.lora_rank
    and (config.lora.save_adapters or config.lora.save_merged)
  ):
    return
  params = model_params(sharding.to_host(state.params))
  if not primary:
    return
  if config.lora.save_adapters:
    out = os.path.join(workdir, "adapters")
    base = init.hf_dir(config.init) if init.kind(config.init) == "hf" else ""
    peft_format.save_adapter(out, params, model_cfg, base_model=base)
    print(f"adapters: {out}")
  if config.lora.save_merged:
    out = os.path.join(workdir, "merged")
    hf.export_model(
      out,
      params,
      model_cfg,
      tokenizer=tokenizer,
      source=os.path.join(workdir, init.SOURCE_DIR),
      overwrite=True,
    )
    print(f"merged model: {out}")


def write_summary(objective, workdir: str, metrics_path: str) -> None:
  """WORKDIR/summary.md: the objective's before/after table, if any."""
  if not (objective.summary_rows or objective.evaluators):
    return
  report = evaluators.summary_table(
    objective.summary_rows, *metrics.first_and_last(metrics_path)
  )
  if report:
    print(report)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
      f.write(report + "\n")


CURVES = "curves.png"


def write_curves(workdir: str, metrics_path: str) -> str | None:
  """WORKDIR/curves.png: the run's train/eval curves (`jft.plot.curves`).

  Returns its path, or None after printing one warning line: a plot that
  fails (a broken matplotlib, an odd metrics file) never fails a run that
  has finished training.
  """
  out = os.path.join(workdir, CURVES)
  try:
    # Imported inside the guard, so that not even a broken matplotlib
    # install can stop a run from starting or from finishing.
    from jft import plot

    plot.curves(
      [metrics_path], out, labels=[os.path.basename(os.path.abspath(workdir))]
    )
  except Exception as e:  # any failure is only a warning
    reason = " ".join(f"{type(e).__name__}: {e}".split())
    print(f"warning: {out} not written ({reason[:300]})")
    return None
  return out
