"""Webhooks: a job's status changes POSTed to its ``callback_url``, signed the Standard Webhooks way.

The parts, one module each: ``models`` (tables: subscriptions, the delivery outbox, per-owner secrets),
``policy`` (which URLs the operator allows, and no internal addresses behind them), ``signing``
(``webhook-id``/``webhook-timestamp``/``webhook-signature``), ``outbox`` (a status change writes its
event in the same transaction as the change, so none is lost and the worker only ever inserts a row),
``sender`` (a thread in the API process that delivers due events with exponential backoff) and
``endpoints`` (the delivery log and the owner's secret).
"""
