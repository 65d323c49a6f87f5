"""DeepSpeed's launcher (`deepspeed.launcher.runner`) with every word of the remote command quoted.

pdsh joins its arguments into one line that each node's login shell runs. DeepSpeed's PDSHRunner
builds that line from unquoted pieces: `cd <cwd>;`, `export K=<value>;` for each propagated
variable, `--enable_each_rank_log=<dir>` and the user arguments (`--config <out_dir>/config.yaml`,
wrapped in double quotes only when they hold a space, where `$(...)` still runs). A `;` in
train.out_dir would run a command on every node and a space would break the launch. Here each of
those words is `shlex.quote`d, so the remote shell gets back exactly the local string: a `;`
runs nothing and a space works. `%n` (pdsh's node rank) stays bare for pdsh to fill in.

Usage (what `hiervl submit deepspeed` runs): python -m hiervl.launch.pdsh_runner <runner args>

Owns: quoting of DeepSpeed's pdsh command line.
Must not touch: which arguments are passed (launch/deepspeed_launch.py).
"""

from __future__ import annotations

import os
import shlex
import sys


def quoted_pdsh_runner():
    """A PDSHRunner subclass whose remote command words are shell-quoted."""
    from deepspeed.launcher.multinode_runner import PDSHRunner

    class QuotedPDSHRunner(PDSHRunner):
        def add_export(self, key, var):
            self.exports[key.strip()] = shlex.quote(var.strip())

        def parse_user_args(self):
            return [shlex.quote(str(a)) for a in self.args.user_args]

        def get_cmd(self, environment, active_resources):
            cmd, kill_cmd, env = super().get_cmd(environment, active_resources)
            cwd = os.path.abspath(".")
            fixed = []
            for word in cmd:
                if word == f"cd {cwd};":
                    word = f"cd {shlex.quote(cwd)};"
                elif word == sys.executable:
                    word = shlex.quote(word)
                elif word.startswith("--enable_each_rank_log="):
                    word = "--enable_each_rank_log=" + shlex.quote(word.split("=", 1)[1])
                fixed.append(word)
            return fixed, kill_cmd, env

    return QuotedPDSHRunner


def main(argv: list[str] | None = None) -> None:
    from deepspeed.launcher import runner

    runner.PDSHRunner = quoted_pdsh_runner()
    runner.main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
