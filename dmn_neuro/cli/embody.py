"""``dmn-neuro embody CKPT`` and ``dmn-neuro embody calibrate`` (NeuroMechFly body; ``make embody-env``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click


class _EmbodyGroup(click.Group):
    """``embody calibrate ...`` is the subcommand; anything else is ``embody run ...``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group("embody", cls=_EmbodyGroup)
def embody() -> None:
    """Run a trained checkpoint in the NeuroMechFly body: `embody CKPT --episodes N --out DIR`,
    or measure the body for the arena: `embody calibrate --out FILE`."""


def _bar(desc, unit):
    from tqdm import tqdm

    holder = []

    def progress(done, total):
        if not holder:
            holder.append(tqdm(total=total, desc=desc, file=sys.stderr, unit=unit))
        holder[0].n = done
        holder[0].refresh()
        if done >= total:
            holder[0].close()

    return progress


@embody.command("calibrate")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Calibration JSON to write.")
@click.option("--drives", default=",".join(str(d) for d in (-0.4, 0.0, 0.3, 0.6, 0.9, 1.2)), show_default=True,
              help="Comma-separated drive grid per side (increasing, from <= 0 to > 0; < 0 steps backwards).")
@click.option("--settle", "settle_s", type=click.FloatRange(min=0), default=0.3, show_default=True,
              help="Seconds walked before measuring each drive pair.")
@click.option("--measure", "measure_s", type=click.FloatRange(min=0.01), default=0.5, show_default=True,
              help="Seconds measured per drive pair.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Local processes.")
@click.option("--no-figure", is_flag=True, help="Skip the arena-vs-body comparison runs and figure.")
def calibrate_cmd(out, drives, settle_s, measure_s, workers, no_figure) -> None:
    """Measure the body's speed and turning rate per two-sided drive, and its odor-sensor
    geometry; write the table (and, next to it, the arena-vs-body figure)."""
    from connectome.atomic import write_text
    from dmn_neuro.embodiment.calibration import calibrate, compare, plot_calibration

    try:
        grid = [float(d) for d in drives.split(",") if d.strip()]
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of numbers: {drives!r}", param_hint="--drives")
    out = Path(out)
    cal = calibrate(grid, settle_s=settle_s, measure_s=measure_s, workers=workers,
                    progress=_bar("calibrating", "pair"))
    if not no_figure:
        comp = compare(cal, workers=workers)
        cal["comparison"] = comp
        plot_calibration(cal, comp, out.with_suffix(".png"))
    write_text(out, json.dumps(cal, indent=1))
    t = cal["motor_table"]
    click.echo(json.dumps({"out": str(out), "speed_at_max_drive_mm_s": t["speed_mm_s"][-1][-1],
                           "sim_s_per_wall_s": cal["sim_s_per_wall_s"], "sensor_height_mm": cal["sensors"]["height_mm"]}))


@embody.command("run")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.option("--calibration", "calibration", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The body calibration the checkpoint's arena was trained with (embody calibrate --out).")
@click.option("--episodes", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Output folder (default: ./embody_<checkpoint name>[_odor_removed]).")
@click.option("--seed", type=int, default=777, show_default=True,
              help="Episode seed (stream 3: starts and sources never used in training or evaluate).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Time limit in circuit steps (default: the training episode length).")
@click.option("--odor-removed", is_flag=True, help="The control: the same episodes with zero odor.")
@click.option("--sensors", type=click.Choice(["auto", "both", "antennae", "palps"]), default="auto", show_default=True,
              help="Odor sensors of each side: mean of palp and antenna, or one of them; auto = the set at whose "
                   "calibrated position the checkpoint's model antennae were in training.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Local processes.")
@click.option("--video", is_flag=True, help="Also write an MP4 of the first successful episode (headless).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def run_cmd(checkpoint, calibration, episodes, out, seed, steps, odor_removed, sensors, workers, video, as_json) -> None:
    """Run CHECKPOINT's circuit in the NeuroMechFly body (embody.json, trajectories.png, optional video)."""
    from dmn_neuro.embodiment.run import embody as run_embody

    name = Path(checkpoint).name.replace(".", "_")
    out = Path(out) if out else Path.cwd() / f"embody_{name}{'_odor_removed' if odor_removed else ''}"
    rep = run_embody(checkpoint, calibration, episodes, out, seed=seed, steps=steps, odor_removed=odor_removed,
                     sensors=sensors, video=video, workers=workers, progress=_bar("episodes", "episode"))
    b, a = rep["body"], rep["arena_same_starts"]
    summary = {"out": str(out), "episodes": episodes, "odor_removed": odor_removed,
               "body_success_rate": b["success_rate"], "arena_success_rate": a["success_rate"],
               "body_final_distance_mm_mean": b["final_distance_mm_mean"], "body_time_to_goal_ms_mean": b["time_to_goal_ms_mean"],
               "simulated_s_per_wall_s": b["simulated_s_per_wall_s"], "video": rep.get("video", {}).get("path")}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"body: {100 * b['success_rate']:.0f} % reached ({b['n_success']}/{episodes}); arena on the same "
                   f"starts: {100 * a['success_rate']:.0f} %; {b['simulated_s_per_wall_s']:.3f} simulated s per wall s; "
                   f"results in {out}")
