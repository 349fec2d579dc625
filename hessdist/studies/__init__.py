"""The analyses the seeds' studies ran, each a function of an operator (in-process or on Ray
workers, the same numbers): products checked against a dense float64 Hessian (:mod:`.verify`),
the Hessian split into Gauss–Newton and the rest (:mod:`.decompose`), numerical rank
(:mod:`.rank`)."""
