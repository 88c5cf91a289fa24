"""The readable table ``bench-cost`` prints to stderr beside its JSON."""

from __future__ import annotations

from ..config import XT_SOURCES

SPLIT_ROWS = ("fresh_xt_mean", "teacher_fwd_b3", "teacher_fwd_b2", "student_er_fwd", "attn_mass_fwd", "student_er_bwd",
              "student_pr_fwd_nograd", "student_pr_fwd_graph", "student_pr_graph_saved_mib", "student_pr_fwd_bwd",
              "student_b3_fwd_attn", "student_b3_bwd", "adamw")


def table(result: dict) -> str:
    """A readable summary of :func:`run`'s JSON: a section per measurement."""
    lines = [f"device: {result['device']}", ""]
    for source in XT_SOURCES:
        lines += _source_lines(result["speed"], source)
    lines += _weighted_lines(result["speed"]) + _split_lines(result["speed"])
    lines += _memory_lines(result["attention_loss_memory"], result.get("real_zimage_memory_estimate"))
    lines += _run_time_lines(result["real_zimage_run_time_estimate"])
    return "\n".join(lines)


def _weighted_lines(speed: list[dict]) -> list[str]:
    """Seconds and ratios with the paper λ rule's step kinds weighed as on the toy."""
    lines = ["", "paper λ rule, step kinds weighed as on the toy: model  source  s/step  speedup  overhead"]
    for r in speed:
        for source in XT_SOURCES:
            w = r["paper_lambda_weighted"][source]
            lines.append(f"  {r['model']:<16} {r['image_tokens']:>5}  {source:<6} {w['seconds_per_step']:>8.3f}  "
                         f"{w['speedup_vs_reference']:>6.2f}×  {w['overhead_vs_gated_esd']:>6.2f}")
    return lines


def _split_lines(speed: list[dict]) -> list[str]:
    """Where a step's time goes, a column per model."""
    models = "  ".join(r["model"] + f"-{r['image_tokens']}" for r in speed)
    lines = ["", "cost split, s (median; x_t: mean over random levels): " + models]
    for part in SPLIT_ROWS:
        lines.append(f"  {part:<24}" + "".join(f"{r['split_seconds'][part]:>12.4f}" for r in speed))
    return lines


def _memory_lines(mem: dict, estimate: dict | None) -> list[str]:
    """The attention loss's saved bytes against materialised maps, and the real model's memory estimate if made."""
    lines = ["", "attention loss, saved bytes per layer: image tokens  ours  materialised"]
    lines += [f"  {r['image_tokens']:>6}  {r['ours'] / 2**20:9.2f} MiB  {r['materialised'] / 2**20:9.2f} MiB"
              for r in mem["rows"]]
    g = mem["growth_exponent"]
    lines.append(f"  growth exponent: ours {g['ours']:.2f}, materialised {g['materialised']:.2f}")
    if estimate:
        lines += ["", "real Z-Image (estimate): case  needs GiB  budget GB  fits"]
        lines += [f"  {k:<20} {v['needs_gib']:>6.2f}  {v['budget_gb']:>4}  {v['fits']}"
                  for k, v in estimate["fits"].items()]
    return lines


def _run_time_lines(t: dict) -> list[str]:
    """1000 steps at 512² on one H100, composed from the issue's figures."""
    comp = t["toy_lambda_fractions"]
    f = comp["fractions"]
    lines = ["", f"1000 steps at 512² on one H100 (composed from the issue's H100 figures; λ step kinds from the toy: "
                 f"batched {f['batched']:.2f}, recomputed {f['recomputed']:.2f}, λ=0 {f['lambda_zero']:.2f})",
             "  config            minutes  (λ always 0 / always >0)  ESD min  overhead  ref min ≥  speedup ≥  "
             "peak GB  ≤10 min"]
    for k, r in comp["rows"].items():
        lo, hi = t["lambda_always_zero"]["rows"][k]["minutes"], t["lambda_always_positive"]["rows"][k]["minutes"]
        lines.append(f"  {k:<16} {r['minutes']:>8.1f}  ({lo:.1f} / {hi:.1f})  {r['gated_esd_minutes']:>14.1f}  "
                     f"{r['overhead_vs_gated_esd']:>8.2f}  {r['reference_minutes_lower_bound']:>9.1f}  "
                     f"{r['speedup_vs_reference_at_least']:>8.2f}×  {r['peak_gb_estimate']:>7.1f}  {r['meets_10_min']}")
    d = comp["default_settings"]
    lines.append(f"  the default settings ({d['xt_source']}, checkpointing auto) on {comp['memory_budget_gb']:g} GB "
                 f"checkpoint {d['checkpointed_layers']} of {d['of_layers']} layers: {d['minutes']:.1f} min, "
                 f"≤10 min {d['meets_10_min']}")
    return lines + [f"  {k}: {v}" for k, v in comp["assumptions"].items()]


def _source_lines(speed: list[dict], source: str) -> list[str]:
    """The table's seconds and ratios of one x_t source, a line per model."""
    default = " (default)" if speed and speed[0]["default_xt_source"] == source else ""
    lines = [f"x_t source: {source}{default}",
             "  model            img tok  ref s/step  ours s/step (λ>0 / λ=0)  ESD s/step  speedup (λ>0 / λ=0)  "
             "overhead (λ>0 / λ=0)"]
    for r in speed:
        s = r["seconds_per_step"]
        pos, zero = f"{source}_lambda_positive", f"{source}_lambda_zero"
        lines.append(
            f"  {r['model']:<16} {r['image_tokens']:>7}  {s['reference']:>10.3f}  {s[f'ours_{pos}']:>10.3f} / "
            f"{s[f'ours_{zero}']:<10.3f}  {s[f'gated_esd_{source}']:>10.3f}  "
            f"{r[f'speedup_vs_reference_{pos}']:>6.2f}× / {r[f'speedup_vs_reference_{zero}']:.2f}×  "
            f"{r[f'overhead_vs_gated_esd_{pos}']:>8.2f} / {r[f'overhead_vs_gated_esd_{zero}']:.2f}")
    return lines
