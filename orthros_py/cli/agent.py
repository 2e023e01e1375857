"""``orthros agent`` (the daemon, in the foreground) and ``orthros keygen`` (the cluster key).

Every option of ``orthros agent`` can also come from the environment (``ORTHROS_AGENT_*``), which
is how the systemd unit (vagrant/orthros-agent.service) passes /etc/orthros/agent.env.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path
from types import FrameType

import click

from orthros_py.agent.auth import DEFAULT_KEY_PATH, REPLAY_WINDOW, load_key, write_key
from orthros_py.agent.protocol import DEFAULT_PORT, PROTOCOL_VERSION
from orthros_py.cli.context import Env
from orthros_py.net.conn import format_endpoint, parse_endpoint

DEFAULT_IMAGES_ROOT = Path("/var/lib/orthros/images")
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def _log_to(env: Env, verbose: bool) -> logging.Logger:
    """The agent logs plain lines to stderr (journald and log files keep them as they are)."""
    logger = logging.getLogger("orthros")
    handler = logging.StreamHandler(env.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    return logging.getLogger("orthros.agent")


@click.command()
@click.option("--listen", envvar="ORTHROS_AGENT_LISTEN", default=f"0.0.0.0:{DEFAULT_PORT}",
              show_default=True, metavar="ADDR:PORT",
              help="Where to accept callers ([IPv6]:PORT for IPv6; port 0 picks a free port, "
                   "which the log names).")
@click.option("--key", "key_path", envvar="ORTHROS_AGENT_KEY", type=click.Path(path_type=Path),
              default=DEFAULT_KEY_PATH, show_default=True,
              help="The cluster key file (the same on every host; see 'orthros keygen').")
@click.option("--images-root", envvar="ORTHROS_AGENT_IMAGES_ROOT",
              type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_IMAGES_ROOT,
              show_default=True, help="Directory holding this host's image directories.")
@click.option("--scratch-root", envvar="ORTHROS_AGENT_SCRATCH_ROOT", default=None,
              metavar="DIR|none",
              help="Directory in memory (a tmpfs) for transient images, a migration's: "
                   "'none' keeps them on disk [default: /dev/shm/orthros-images/NAME where "
                   "/dev/shm is a tmpfs].")
@click.option("--name", envvar="ORTHROS_AGENT_NAME", default=None,
              help="This host's name in errors and answers [default: the host name].")
@click.option("--replay-window", type=click.FloatRange(min=1.0), default=REPLAY_WINDOW,
              show_default=True,
              help="Seconds a request stays valid; the hosts' clocks must agree within it.")
@click.option("--cgroup-root", envvar="ORTHROS_AGENT_CGROUP_ROOT", default="/", show_default=True,
              help="Where this host keeps its containers' cgroups: trees migrated here from a "
                   "host with another root are recreated below this one.")
@click.option("-v", "--verbose", is_flag=True, help="Log every request, pings included.")
@click.pass_obj
def agent(env: Env, listen: str, key_path: Path, images_root: Path, scratch_root: str | None,
          name: str | None, replay_window: float, cgroup_root: str, verbose: bool) -> None:
    """Run this host's agent in the foreground, logging to stderr, until SIGTERM or Ctrl-C."""
    from orthros_py.agent.server import AgentServer
    from orthros_py.agent.state import Agent, default_scratch_root
    from orthros_py.agent.table import OPS

    try:
        host, port = parse_endpoint(listen, listen=True)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--listen") from err
    log = _log_to(env, verbose)
    key = load_key(key_path)
    if not cgroup_root.startswith("/") or ".." in cgroup_root.split("/"):
        raise click.BadParameter("give an absolute cgroup path", param_hint="--cgroup-root")
    name = name or socket.gethostname().split(".")[0]
    if scratch_root is not None and scratch_root != "none" and not scratch_root.startswith("/"):
        raise click.BadParameter("give an absolute directory, or 'none'",
                                 param_hint="--scratch-root")
    scratch = (None if scratch_root == "none" else
               Path(scratch_root) if scratch_root else default_scratch_root(name))
    state = Agent(name, images_root, key, listen_host=host, cgroup_root=cgroup_root,
                  scratch_root=scratch)
    server = AgentServer(state, (host, port), replay_window=replay_window)
    from orthros_py.agent.ops.pair import pairs_of

    resumed = pairs_of(state).resume_all()  # the pairs this host took part in before
    if resumed:
        log.info("took up pairs again: %s", ", ".join(resumed))

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if os.geteuid() != 0:
        log.warning("not running as root: dump, restore and page servers will be refused")
    log.info("agent %s listening on %s (protocol v%d, %d operations), images in %s%s",
             state.name, format_endpoint(*server.endpoint), PROTOCOL_VERSION, len(OPS),
             state.images_root,
             f", transient ones in {state.scratch_root}" if state.scratch_root else "")
    try:
        server.serve(stop)
    finally:
        state.close()
    log.info("agent %s stopped", state.name)


@click.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_KEY_PATH,
              show_default=True, help="Where to write the key.")
@click.option("--force", is_flag=True, help="Replace an existing key.")
@click.pass_obj
def keygen(env: Env, out: Path, force: bool) -> None:
    """Write a new random cluster key (32 bytes, mode 0600) for the agents and their callers."""
    path = write_key(out, force=force)
    env.console.print(f"wrote a new cluster key to {path} (mode 0600): copy it, mode and all, "
                      "to every host and to wherever 'orthros' calls the agents from")


COMMANDS = [agent, keygen]
