"""The search: one seed's ask-score-tell loop (tuner), several seeds sharing engine calls (lockstep), and the
checkpoint that lets either continue bit for bit."""
