"""Rewards, with no JAX: named reward functions and scoring (scoring), the worker pool that runs
them with deadlines (verifier_pool, worker), the math grader, format/countdown/code checks
(checks), and the sandbox for untrusted code (sandbox/)."""
