"""Executes one notebook with papermill for run_all.sh, its kernel on IPC sockets.

    python tools/execute_notebook.py INPUT OUTPUT --cwd DIR --kernel NAME --parameters YAML

Same as ``papermill INPUT OUTPUT --cwd DIR -k NAME -y YAML``, except for the transport: over IPC
(Unix sockets, readable by this user only) the kernel has no reason to warn that its TCP traffic is
unencrypted, as it does for every notebook otherwise."""

from __future__ import annotations

import argparse
import os
import sys
import uuid

import papermill
import yaml
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir
from traitlets import default


class IPCKernelManager(AsyncKernelManager):
    """A kernel manager whose kernels talk over IPC instead of TCP on localhost."""

    @default("transport")
    def _default_transport(self) -> str:
        return "ipc" if sys.platform != "win32" else "tcp"  # no Unix sockets there

    def _ip_default(self) -> str:  # the sockets' path prefix: Jupyter's runtime folder, not the notebook's
        if self.transport != "ipc":
            return super()._ip_default()
        folder = jupyter_runtime_dir()
        os.makedirs(folder, mode=0o700, exist_ok=True)
        return os.path.join(folder, f"lossgrad-kernel-{uuid.uuid4().hex[:12]}-ipc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--cwd", default=None)
    parser.add_argument("--kernel", default=None)
    parser.add_argument("--parameters", default="{}", help="YAML mapping of the parameters cell's names")
    parser.add_argument("--no-progress-bar", action="store_true")
    args = parser.parse_args()
    papermill.execute_notebook(args.input, args.output, parameters=yaml.safe_load(args.parameters) or {},
                               kernel_name=args.kernel, cwd=args.cwd, progress_bar=not args.no_progress_bar,
                               kernel_manager_class=IPCKernelManager)


if __name__ == "__main__":
    main()
