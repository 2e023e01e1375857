"""The sync benchmark's results on disk: results.json (and reading it back), results.md with the
shortest surviving heartbeat and the targets met or not, the notes a reader needs, and the PNG
plots (skews and times per heartbeat, elections per heartbeat and per stagger).

Wraps the output directory and matplotlib (imported lazily, only for plots). Needs no
privileges beyond writing ``--out``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orthros_py.bench.pair.model import Figure
from orthros_py.bench.pair.report import fmt_bytes, fmt_fig
from orthros_py.bench.stats import fmt_ms
from orthros_py.bench.sync.model import (
    HEARTBEAT,
    POSITIONS,
    RESTORE_STAGES,
    SAVE_STAGES,
    SEED_RESUME_SKEW_MS,
    STAGGER,
    TARGET_RESUME_SKEW_US,
    BenchResults,
    GroupSummary,
    SyncRound,
    round_line,
)

# --- formatting ----------------------------------------------------------------------------------


def fmt_us(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}"


def fmt_ms0(v: float | None) -> str:
    return fmt_ms(v, 0)


def fmt_s(v: float | None) -> str:
    return "—" if v is None else f"{v:,.2f}"


def fmt_int(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def fig(s: GroupSummary, key: str, fmt: Callable[[float | None], str] = fmt_ms0) -> str:
    return fmt_fig(s.figures.get(key), fmt)


def _scaled(f: Figure | None, k: float) -> Figure | None:
    if f is None:
        return None
    return Figure(None if f.median is None else f.median * k,
                  None if f.low is None else f.low * k,
                  None if f.high is None else f.high * k, f.n)


def fmt_by_leader(s: GroupSummary) -> str:
    """Elections / rounds for each turn of the leader in the resume order."""
    if not s.by_leader:
        return "—"
    return ", ".join(f"{POSITIONS[p] if p < len(POSITIONS) else p} {e}/{n}"
                     for p, (e, n) in sorted(s.by_leader.items()))


def load_results(path: Path) -> BenchResults:
    return BenchResults.from_dict(json.loads(path.read_text()))


def _met(m: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[m]


def _methods(rounds: Sequence[SyncRound]) -> str:
    found = sorted({x for r in rounds for m in r.members for x in m.get("data_methods") or []})
    return ", ".join(found) or "—"


# --- results.md ----------------------------------------------------------------------------------


def markdown(res: BenchResults) -> str:
    cfg = res.config
    env = res.env
    criu = env.get("criu")
    if isinstance(criu, dict):
        criu = criu.get("version") or criu.get("error")
    lines = ["# Synchronized save and restore of a 3-member etcd cluster (`orthros sync`)", ""]
    lines.append(
        f"Host: Linux {env.get('kernel', '?')}, {env.get('cpus', '?')} CPUs; "
        f"{env.get('etcd', 'etcd ?')}; CRIU {criu or '?'}; data directories on a "
        f"{cfg.volume_mib:,} MiB btrfs (loop device). Lab: alpha, beta, gamma one etcd member "
        "each (under `unshare --time`), a writer on the client host. Seed "
        f"{res.seed}. Started {res.started}"
        + (f", finished {res.finished}" if res.finished else "")
        + (f" ({res.wall_s / 60:.1f} min)" if res.wall_s else "")
        + (" (interrupted: partial results)" if res.interrupted else "") + ".")
    lines += ["", f"**Result:** {res.headline}.", ""]
    lines += ["## Targets", "", "| target | goal | measured | | |", "|---|---|---|---|---|"]
    for tg in res.targets:
        lines.append(f"| {tg.name} | {tg.goal} | {tg.value} | {_met(tg.met)} | {tg.detail} |")

    hbs = res.heartbeats
    if hbs:
        lines += [
            "", "## 1. Heartbeat sweep", "",
            f"Per heartbeat interval a fresh cluster (election timeout "
            f"{cfg.election_factor:g} x heartbeat, new data directories), then {cfg.reps} "
            "rounds of: `sync save --leave-running`, the writer writes "
            f"{cfg.write_s:g} s, `sync restore` of that snapshot, the cluster looked at at "
            f"once and {cfg.settle_s:g} s later (at least two election timeouts after each "
            "operation), the snapshot deleted. An *election* is a raft term that grew, "
            "another leader, or a campaign in etcd's logs (a member that became a "
            "candidate): across the save from it to the restore, across the restore from it "
            "to the end of the round. Terms are compared with the one before the save (what "
            "the snapshot holds), each read once a put through the leader was committed "
            "(etcd's status reports the last applied entry's term, which a campaign leaves "
            "unchanged). Medians [min-max] over the rounds.", "",
            "| heartbeat | election timeout | rounds ok | **without an election** | "
            "election across save | election across restore | campaigns (restore) | "
            "term growth (restore) | healthy at once |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in hbs:
            lines.append(f"| {s.heartbeat_ms:,} ms | {s.election_ms:,} ms | {s.ok}/{s.rounds} | "
                         f"**{s.survived}/{s.rounds}** | {s.save_elections} | "
                         f"{s.restore_elections} | {fmt_fig(s.campaigns, fmt_int)} | "
                         f"{fmt_fig(s.term_growth, fmt_int)} | "
                         f"{s.healthy_at_once}/{s.ok} |")
        lines += [
            "", "### Times and skews", "",
            "*freeze skew*: how far apart the members froze; *resume skew*: how far apart they "
            "resumed (the write to the freezer, on the coordinator's clock; *settled*: when "
            "each group was seen thawed). *frozen*: the save's freeze to its resume, the "
            "slowest member. *writer gap*: the client's longest time without an "
            "acknowledgement around the operation (a put to a member that the restore "
            "replaced waits out its 1 s timeout). *woken*: how far apart the agents were "
            "when they went to write, before the write itself.", "",
            "| heartbeat | save ms | restore ms | frozen ms | freeze skew µs | save's resume "
            "skew µs | restore's resume skew µs | restore's resume skew (settled) µs | "
            "restore's resume skew (woken) µs | clock error µs | writer gap, save s | "
            "writer gap, restore s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in hbs:
            lines.append(
                f"| {s.heartbeat_ms:,} ms | {fig(s, 'save_ms')} | {fig(s, 'restore_ms')} | "
                f"{fig(s, 'frozen_ms')} | {fig(s, 'freeze_skew_us', fmt_us)} | "
                f"{fig(s, 'save_resume_skew_us', fmt_us)} | "
                f"{fig(s, 'resume_skew_us', fmt_us)} | "
                f"{fig(s, 'resume_settled_skew_us', fmt_us)} | "
                f"{fig(s, 'resume_requested_skew_us', fmt_us)} | "
                f"{fig(s, 'restore_clock_error_us', fmt_us)} | {fig(s, 'gap_save_s', fmt_s)} | "
                f"{fig(s, 'gap_restore_s', fmt_s)} |")
        lines += ["", "### Stages (ms)", "",
                  "| heartbeat | " + " | ".join(f"save: {x}" for x in SAVE_STAGES) + " | "
                  + " | ".join(f"restore: {x}" for x in RESTORE_STAGES) + " |",
                  "|---:|" + "---:|" * (len(SAVE_STAGES) + len(RESTORE_STAGES))]
        for s in hbs:
            cells = [fig(s, f"save:{x}") for x in SAVE_STAGES]
            cells += [fig(s, f"restore:{x}") for x in RESTORE_STAGES]
            lines.append(f"| {s.heartbeat_ms:,} ms | " + " | ".join(cells) + " |")
        hb_rounds = [r for r in res.rounds if r.part == HEARTBEAT]
        lines += ["", "### Snapshot sizes", "",
                  "*checkpoint*: CRIU's images of the three members (disk blocks); *data*: "
                  "their data directories' apparent size (snapshotted by "
                  f"{_methods(hb_rounds)}: shared with the live files until either is "
                  "written); *btrfs used*: the whole volume at the round's end (synced), the "
                  "live data and the snapshot, still kept, together.", "",
                  "| heartbeat | checkpoint | data (apparent) | btrfs used, snapshot kept | "
                  "keys acked between save and restore |",
                  "|---:|---:|---:|---:|---:|"]
        for s in hbs:
            lines.append(f"| {s.heartbeat_ms:,} ms | {fig(s, 'image_bytes', fmt_bytes)} | "
                         f"{fig(s, 'data_bytes', fmt_bytes)} | "
                         f"{fig(s, 'volume_used_bytes', fmt_bytes)} | "
                         f"{fig(s, 'acked_between', fmt_int)} |")
    sts = res.staggers
    if sts:
        lines += [
            "", "## 2. Stagger sweep (the control)", "",
            f"Heartbeat {cfg.stagger_heartbeat_ms} ms (election timeout "
            f"{cfg.election_ms(cfg.stagger_heartbeat_ms):,} ms), one cluster, "
            f"{cfg.stagger_reps} rounds each with every stagger once in a shuffled order. The "
            "save is synchronized as above; the restore resumes the members *stagger* ms apart "
            "in turn (the last one 2 x stagger after the first), as an unsynchronized restore "
            f"would (the seed paper had ~{SEED_RESUME_SKEW_MS} ms left). When the cluster was "
            "not healthy a moment after the restore it was waited for before the next round.",
            "Before each round the leader is moved (etcd's MoveLeader) to the member "
            "resumed last, in the middle, then first, in turn: a leader resumed last leaves "
            "its followers 2 x stagger without heartbeats, one resumed first is alone for "
            "a stagger; *by the leader's turn* counts the elections for each.",
            "", "| stagger | rounds ok | election across restore | by the leader's turn "
            "(first, middle, last) | campaigns | term growth | healthy at once | healthy "
            "again after s | measured resume spread ms | writer gap, restore s |",
            "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for s in sts:
            spread_ms = _scaled(s.figures.get("resume_skew_us"), 1 / 1000)
            lines.append(f"| {s.stagger_ms:,} ms | {s.ok}/{s.rounds} | "
                         f"**{s.restore_elections}/{s.ok}** | {fmt_by_leader(s)} | "
                         f"{fmt_fig(s.campaigns, fmt_int)} | "
                         f"{fmt_fig(s.term_growth, fmt_int)} | {s.healthy_at_once}/{s.ok} | "
                         f"{fmt_fig(s.recovered_s, fmt_s)} | "
                         f"{fmt_fig(spread_ms, lambda v: fmt_ms(v, 1))} | "
                         f"{fig(s, 'gap_restore_s', fmt_s)} |")
    if res.rounds:
        lines += ["", "## Rounds one by one", ""]
        for r in res.rounds:
            lines.append(f"- {round_line(r)}")
            if r.resume_stamps_us:
                lines.append("  restore's resume, µs after the first agent woke (woken / "
                             "written / settled): " + "; ".join(
                                 f"{k} {' / '.join(fmt_us(x) for x in v)}"
                                 for k, v in sorted(r.resume_stamps_us.items(),
                                                    key=lambda kv: kv[1][0])))
            if r.log:
                lines.append("  etcd: " + "; ".join(r.log[:8])
                             + (" ..." if len(r.log) > 8 else ""))
    if res.clusters:
        lines += ["", "## Clusters", "", "| cluster | heartbeat | election | started in s | "
                  "member RSS | threads | rounds |", "|---|---:|---:|---:|---:|---:|---:|"]
        for c in res.clusters:
            rss = c.get("rss_kib") or {}
            threads = c.get("threads") or {}
            lines.append(f"| {c.get('tag')} | {c.get('heartbeat_ms')} ms | "
                         f"{c.get('election_ms')} ms | {fmt_s(c.get('start_s'))} | "
                         + (", ".join(f"{k} {v / 1024:,.0f} MiB" for k, v in rss.items())
                            or "—") + " | "
                         + (", ".join(f"{k} {v}" for k, v in threads.items()) or "—")
                         + f" | {c.get('rounds', 0)} |")
    errors = [e for s in [*hbs, *sts] for e in s.errors]
    if errors or res.notes or res.leftovers or any(c.get("error") for c in res.clusters):
        lines += ["", "## Failures and notes", ""]
        lines += [f"- cluster {c.get('tag')}: {c['error']}" for c in res.clusters
                  if c.get("error")]
        lines += [f"- failed: {e}" for e in errors]
        lines += [f"- {n}" for n in res.notes]
        lines += [f"- cleanup: {x}" for x in res.leftovers]
    return "\n".join(lines) + "\n"


def notes_for(res: BenchResults) -> list[str]:
    """What a reader of the tables needs to know about these runs."""
    notes = [f"{res.env.get('cpus', '?')} CPUs: the three etcd members, the writer and the "
             "agents' dumps and restores (CRIU, Python) share them; an election at a short "
             "heartbeat may come from a member starved of CPU, not from the skew.",
             "The skews are measured from each agent's own stamps, brought onto the "
             "coordinator's clock (NTP-style); every lab host shares this machine's clock, "
             "so the clock error is only the estimate's."]
    bad = [r for r in res.rounds if r.ok and r.part == HEARTBEAT and not r.survived]
    if bad:
        notes.append("Heartbeat rounds with an election or an unhealthy cluster: "
                     + "; ".join(f"{r.name} ({_why(r)})" for r in bad[:10])
                     + (" ..." if len(bad) > 10 else "") + ". etcd's own lines about it are "
                     "under the round (logs/<cluster>/<host>.log hold all).")
    return notes


def _why(r: SyncRound) -> str:
    parts = []
    if r.save_election:
        parts.append(f"save: term +{r.save_term_growth}")
    if r.restore_election:
        parts.append(f"restore: term +{r.restore_term_growth}")
    if not r.healthy_settled:
        parts.append("not healthy a moment after")
    return ", ".join(parts) or "?"


# --- plots ---------------------------------------------------------------------------------------


def _strip(ax: Any, groups: Sequence[Sequence[float]], positions: Sequence[float],
           color: str, label: str, width: float = 0.22) -> None:
    """A box (quartiles, no fliers) and every value as a point, per group."""
    import random as _random

    jitter = _random.Random(0)
    shown = False
    for pos, vals in zip(positions, groups, strict=True):
        if not vals:
            continue
        ax.boxplot([list(vals)], positions=[pos], widths=width, showfliers=False,
                   manage_ticks=False, medianprops={"color": color})
        xs = [pos + jitter.uniform(-width / 3, width / 3) for _ in vals]
        ax.scatter(xs, list(vals), s=14, color=color, zorder=3,
                   label=None if shown else label)
        shown = True


def _values(rounds: Sequence[SyncRound], key: str) -> list[float]:
    return [v for v in (r.value(key) for r in rounds) if v is not None]


def plot(res: BenchResults, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    made: list[Path] = []
    hb_rounds = [r for r in res.rounds if r.part == HEARTBEAT and r.ok]
    hbs = sorted({r.heartbeat_ms for r in hb_rounds}, reverse=True)
    xs = list(range(len(hbs)))
    labels = [f"{h:,} ms" for h in hbs]
    if hbs:
        fig_, ax = plt.subplots(figsize=(10, 4.8))
        series = (("freeze_skew_us", "freeze (save)", "tab:blue", -0.26),
                  ("save_resume_skew_us", "resume (save)", "tab:green", 0.0),
                  ("resume_skew_us", "resume (restore)", "tab:red", 0.26))
        for key, label, color, off in series:
            groups = [[max(v, 0.1) for v in _values([r for r in hb_rounds
                                                       if r.heartbeat_ms == h], key)]
                      for h in hbs]
            _strip(ax, groups, [x + off for x in xs], color, label)
        ax.axhline(TARGET_RESUME_SKEW_US, color="grey", linestyle=":", linewidth=1,
                   label="target: 1 ms")
        ax.axhline(SEED_RESUME_SKEW_MS * 1000, color="black", linestyle="--", linewidth=0.8,
                   label=f"the seed's ~{SEED_RESUME_SKEW_MS} ms")
        ax.set_yscale("log")
        ax.set_xticks(xs, labels)
        ax.set_xlabel("heartbeat interval")
        ax.set_ylabel("spread between the members (µs, log scale)")
        ax.set_title("how far apart the members froze and resumed")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig_.tight_layout()
        made.append(_save(fig_, out / "skews.png"))
        plt.close(fig_)

        fig_, ax = plt.subplots(figsize=(8, 4.8))
        for key, label, color, off in (("save_ms", "save (total)", "tab:blue", -0.26),
                                       ("frozen_ms", "frozen by the save", "tab:green", 0.0),
                                       ("restore_ms", "restore (total)", "tab:red", 0.26)):
            groups = [_values([r for r in hb_rounds if r.heartbeat_ms == h], key) for h in hbs]
            _strip(ax, groups, [x + off for x in xs], color, label)
        ax.set_xticks(xs, labels)
        ax.set_xlabel("heartbeat interval")
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.set_title("save and restore of the 3-member cluster")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
        fig_.tight_layout()
        made.append(_save(fig_, out / "times.png"))
        plt.close(fig_)

        summaries = {s.heartbeat_ms: s for s in res.heartbeats}
        fig_, ax = plt.subplots(figsize=(8, 4.5))
        surv = [summaries[h].survived for h in hbs]
        sav = [summaries[h].save_elections for h in hbs]
        rst = [summaries[h].restore_elections for h in hbs]
        failed = [summaries[h].rounds - summaries[h].ok for h in hbs]
        w = 0.2
        ax.bar([x - 1.5 * w for x in xs], surv, w, color="tab:green",
               label="rounds without an election")
        ax.bar([x - 0.5 * w for x in xs], sav, w, color="tab:orange",
               label="election across the save")
        ax.bar([x + 0.5 * w for x in xs], rst, w, color="tab:red",
               label="election across the restore")
        ax.bar([x + 1.5 * w for x in xs], failed, w, color="grey", label="failed rounds")
        ax.set_xticks(xs, [f"{h:,} ms\n(election {summaries[h].election_ms:,})"
                           for h in hbs])
        ax.set_xlabel("heartbeat interval")
        ax.set_ylabel("rounds")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        best = res.shortest_surviving
        ax.set_title("elections per heartbeat" + (f" (shortest surviving: {best:,} ms)"
                                                  if best is not None else ""))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
        fig_.tight_layout()
        made.append(_save(fig_, out / "elections_heartbeat.png"))
        plt.close(fig_)
    sts = res.staggers
    if sts:
        fig_, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.5))
        sx = list(range(len(sts)))
        slabels = [f"{s.stagger_ms:,}" for s in sts]
        turns = sorted({p for s in sts for p in s.by_leader})
        if turns:
            w = 0.8 / len(turns)
            colors = {0: "tab:green", 1: "tab:orange", 2: "tab:red"}
            for j, p in enumerate(turns):
                xs_ = [x - 0.4 + w * (j + 0.5) for x in sx]
                shares = [s.by_leader[p][0] / s.by_leader[p][1]
                          if s.by_leader.get(p, (0, 0))[1] else 0.0 for s in sts]
                name = POSITIONS[p] if p < len(POSITIONS) else str(p)
                ax1.bar(xs_, shares, w, color=colors.get(p, "tab:grey"),
                        label=f"leader resumed {name}")
            ax1.set_ylabel("share of rounds with an election")
            ax1.set_ylim(0, 1.05)
        else:
            ax1.bar(sx, [s.restore_elections / s.ok if s.ok else 0.0 for s in sts], 0.5,
                    color="tab:red", label="rounds with an election")
            ax1.set_ylabel("share of rounds with an election")
        ax1.set_xticks(sx, slabels)
        ax1.set_xlabel("stagger between the members' resumes (ms)")
        ax1.set_title(f"restores at heartbeat {res.config.stagger_heartbeat_ms} ms")
        ax1.grid(axis="y", alpha=0.3)
        ax1.legend(fontsize="small")
        st_rounds = [r for r in res.rounds if r.part == STAGGER and r.ok]
        groups = [[float(r.restore_term_growth or 0) for r in st_rounds
                   if r.stagger_ms == s.stagger_ms] for s in sts]
        _strip(ax2, groups, sx, "tab:purple", "term growth per round")
        ax2.set_xticks(sx, slabels)
        ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_xlabel("stagger between the members' resumes (ms)")
        ax2.set_ylabel("raft term growth across the restore")
        ax2.set_title("elections per round")
        ax2.grid(axis="y", alpha=0.3)
        ax2.legend(fontsize="small")
        fig_.tight_layout()
        made.append(_save(fig_, out / "elections_stagger.png"))
        plt.close(fig_)
    return made


def _save(fig_: Any, path: Path) -> Path:
    fig_.savefig(path, dpi=110)
    return path


# --- files ---------------------------------------------------------------------------------------


def write_outputs(res: BenchResults, out: Path, *, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res.to_dict(), indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(res))
    made = [out / "results.json", out / "results.md"]
    if plots and res.rounds:
        made += plot(res, out)
    return made
