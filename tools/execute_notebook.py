"""Executes one notebook with papermill for run_all.sh, its kernel on IPC sockets.

    python tools/execute_notebook.py INPUT OUTPUT --cwd DIR --kernel NAME --parameters YAML

Same as ``papermill INPUT OUTPUT --cwd DIR -k NAME -y YAML``, except for the transport: over IPC
(Unix sockets, readable by this user only) the kernel has no reason to warn that its TCP traffic is
unencrypted, as it does for every notebook otherwise."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import papermill
import yaml
from jupyter_client.manager import AsyncKernelManager
from traitlets import default


class IPCKernelManager(AsyncKernelManager):
    """A kernel manager whose kernels talk over IPC instead of TCP on localhost."""

    @default("transport")
    def _default_transport(self) -> str:
        return "ipc" if sys.platform != "win32" else "tcp"  # no Unix sockets there

    def _ip_default(self) -> str:  # the sockets' path prefix: a private folder, not the notebook's
        if self.transport != "ipc":
            return super()._ip_default()
        return os.path.join(SOCKETS, "kernel")  # short: a Unix socket's path holds at most ~107 bytes


SOCKETS = tempfile.mkdtemp(prefix="lg-")  # /tmp/lg-XXXXXXXX: mode 0700, removed at exit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--cwd", default=None)
    parser.add_argument("--kernel", default=None)
    parser.add_argument("--parameters", default="{}", help="YAML mapping of the parameters cell's names")
    parser.add_argument("--no-progress-bar", action="store_true")
    args = parser.parse_args()
    try:
        papermill.execute_notebook(args.input, args.output, parameters=yaml.safe_load(args.parameters) or {},
                                   kernel_name=args.kernel, cwd=args.cwd, progress_bar=not args.no_progress_bar,
                                   kernel_manager_class=IPCKernelManager)
    finally:
        shutil.rmtree(SOCKETS, ignore_errors=True)


if __name__ == "__main__":
    main()
