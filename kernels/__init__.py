"""Pure numerical kernels on numpy arrays: no MPI, no files, no logging, no configuration objects.

Each kernel has three layers (see ``../shared/STYLE.md``): a serial ``@njit`` core that writes into the
outputs it is given, an optional parallel driver, and a plain public function that validates its inputs.
"""
