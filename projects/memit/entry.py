"""MLflow project entry point: a thin shell that turns MLproject parameters into an ``editflow`` command.

MLflow passes every parameter as a string (floats for numbers, "" for unset); this maps them onto the
same CLI (and so the same library pipeline) as ``editflow edit`` / ``stats compute`` / ``eval``.
"""

from __future__ import annotations

import sys

from editflow.job_options import OPTIONS

#: MLproject spelling of an integer option (``--tokens``: the ``stats`` entry point).
INT_OPTIONS = {"--tokens"} | {f"--{o.parameter.replace('_', '-')}" for o in OPTIONS if o.parameter and o.type is int}
#: MLproject flag parameter -> (``editflow edit``'s flag, whether "false" is what sets it).
FLAGS = {f"--{o.parameter.replace('_', '-')}": (o.flag, o.negate) for o in OPTIONS if o.parameter and o.type is bool}


def normalise(args: list[str]) -> list[str]:
    """Drop options whose value is empty (unset: ``editflow edit``'s default), turn "100.0" into "100"
    for integer options and flags' "true"/"false" into the flag or nothing (``--fluency false`` ->
    ``--no-fluency``, ``--from-zero true`` -> ``--from-zero``)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
            if arg in FLAGS:
                flag, negate = FLAGS[arg]
                word = value.strip().lower()
                if word and (word in ("false", "0", "no")) == negate:
                    out.append(flag)
                continue
            if value == "" or (arg in INT_OPTIONS and value in ("0", "0.0") and arg != "--seed"):
                continue
            if arg in INT_OPTIONS:
                try:
                    number = float(value)
                except ValueError:
                    sys.exit(f"error: {arg} must be an integer, got {value!r}")
                if number != int(number):
                    sys.exit(f"error: {arg} must be an integer, got {value!r}")
                value = str(int(number))
            out += [arg, value]
        elif arg.startswith("--") and (i + 1 == len(args) or args[i + 1].startswith("--")):
            i += 1  # an option whose empty value MLflow dropped
        else:
            out.append(arg)
            i += 1
    return out


def main(argv: list[str]) -> None:
    """Run the editflow command. A gate that keeps the new version a candidate (``editflow edit``'s
    exit status 3) is a decision, not a failure: the MLflow run registered its version and succeeds
    (the decision is on the version and the run's ``editflow.gate`` tag)."""
    from editflow.cli import main as cli
    from editflow.commands._options import EXIT_GATE_FAILED

    command = argv[:1]
    if command == ["stats"]:
        command = ["stats", "compute"]
    try:
        cli.main(args=command + normalise(argv[1:]), prog_name="editflow")
    except SystemExit as exc:
        if exc.code == EXIT_GATE_FAILED:
            raise SystemExit(0) from None
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
