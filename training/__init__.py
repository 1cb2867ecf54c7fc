"""The training run below train.py: its state (the one owner of the checkpoint schema), the
step (forward, loss, backward, optimizer step), the non-finite guard and the stop request,
and the progress report.

    training.state     RunState, StepPlan, Position, the resume arithmetic
    training.step      TrainStep and the auxiliary-loss protocol
    training.guard     NonFiniteGuard, StopRequest
    training.progress  ProgressReport: the metrics of a logging step -> log line, TensorBoard
    training.errors    TrainingInputError

Importing the package loads nothing: each module is imported where it is used.
"""
