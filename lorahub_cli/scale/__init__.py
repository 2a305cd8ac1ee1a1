"""Scale-out on Ray (the `ray` extra): the evaluation grid and batch composition on actors that each hold
a loaded base model. Ray is imported only when a command is given --ray. See docs/scale-out.md."""
