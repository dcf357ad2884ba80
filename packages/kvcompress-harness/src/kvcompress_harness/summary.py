"""Words for numbers: metric labels with units, sizes in MB, one line per finished cell."""

from __future__ import annotations

from typing import Any

LABELS = {
    "ppl": "perplexity (lower is better)",
    "accuracy": "accuracy (fraction correct)",
    "f1": "QA F1 (0-100)",
    "token_match": "greedy tokens equal to full's (fraction)",
    "next_token_kl": "next-token KL from full (nats, lower is better)",
    "decode_tokens_per_s": "decode tokens/s (all sequences of the batch)",
    "median_step_ratio": "decode step time / full's (median of paired steps)",
    "mean_ratio": "mean decode step / full's",
    "prefill_s": "prefill time (s)",
    "max_batch": "largest batch that fits (sequences)",
    "kv_bytes": "KV cache held (MB)",
}
SHORT = {"ppl": "perplexity", "accuracy": "accuracy", "f1": "F1", "token_match": "token match",
         "next_token_kl": "KL", "decode_tokens_per_s": "decode tok/s", "max_batch": "max batch"}


def label(record: dict[str, Any], metric: str) -> str:
    """The metric's name in words with its unit: the task's own label, else the harness's, else the key."""
    return (record.get("labels") or {}).get(metric) or LABELS.get(metric) or metric


def mb(value: Any) -> str:
    """Bytes as MB (10^6 bytes) with two decimals, or kB below 0.1 MB."""
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value / 1e6:,.2f} MB" if value >= 1e5 else f"{value / 1e3:,.1f} kB"


def number(value: Any) -> str:
    """A number in 4 significant digits, '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def kept_fraction(record: dict[str, Any]) -> float | None:
    """KV bytes the policy held over full's on the same cell."""
    kv = (record.get("metrics") or {}).get("kv_bytes")
    ref = ((record.get("reference") or {}).get("metrics") or {}).get("kv_bytes")
    return kv / ref if isinstance(kv, (int, float)) and isinstance(ref, (int, float)) and ref else None


def cell_line(record: dict[str, Any]) -> str:
    """One line saying how a cell ended: its primary metric beside full's, and the KV bytes held."""
    head = f"  {record['policy']}: "
    if record.get("status") == "oom":
        return head + f"out of memory (recorded as a result) after {record.get('wall_s', 0):.1f} s"
    if record.get("status") != "ok":
        return head + f"failed after {record.get('wall_s', 0):.1f} s: {record.get('error', '')[:160]}"
    primary = record.get("primary", "")
    m = record.get("metrics") or {}
    ref = (record.get("reference") or {}).get("metrics") or {}
    parts = [f"{SHORT.get(primary, primary)} {number(m.get(primary))}"]
    if record["policy"] != "full" and ref.get(primary) is not None:
        parts[-1] += f" (full {number(ref.get(primary))})"
    if "median_step_ratio" in m and record["policy"] != "full":
        parts.append(f"step {m['median_step_ratio']:.3f}x full's")
    if isinstance(m.get("kv_bytes"), (int, float)):
        frac = kept_fraction(record)
        parts.append(f"KV {mb(m['kv_bytes'])}" + (f" ({frac:.0%} of full)" if frac is not None and
                                                  record["policy"] != "full" else ""))
    return head + ", ".join(parts) + f"  [{record.get('wall_s', 0):.1f} s]"
