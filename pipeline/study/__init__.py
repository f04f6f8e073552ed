"""Method studies on the embedded pair: grids of methods x options x seeds run through pipeline.train and
evaluated (grid, runner, scoring, stats, report); the command line and the grid file's format: pipeline.study.cli."""
