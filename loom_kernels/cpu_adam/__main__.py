"""`python -m loom_kernels.cpu_adam`: compile (or find) the C++ CPU Adam now, outside any measured run.

Prints one line on stdout: where the kernel is (exit 0), or why there is none (exit 1, with the
compiler's output on stderr). While it compiles (about 20 s) it says so on stderr; if another
process is compiling it, it says which one and waits for it.
"""

import sys
import warnings

from loom_kernels.cpu_adam import build_report, failure_detail, load

if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the reason is in the report line below, once
        module = load()
    report = build_report()
    if module is None and failure_detail() and failure_detail() not in report:
        print(failure_detail(), file=sys.stderr)
    print(report)
    sys.exit(0 if module is not None else 1)
