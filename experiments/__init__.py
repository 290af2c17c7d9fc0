"""Studies built on the library: each runs the continual loop many times, in-process (through
`piece_mm.train.execute` and a typed RunConfig, not the command line), and writes tables and figures.

- compare: every method on one sequence, over seeds, each at its best lr of a small sweep;
- sweep: a budget × lr × steps grid and its retention / own-task frontier;
- probe, captioning, where: measurements of a model (eval/ does the measuring; these load the models for it).

In this repository the package sits at the top, beside piece_mm/; the installed distribution carries it as
piece_mm.experiments. Each run of a study goes to a process of its own (runs.py): a crash in one run is reported and
the others go on."""
