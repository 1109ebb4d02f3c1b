"""Local stand-ins and the one-command local stack.

Nothing here is imported by the service itself: the API and the worker talk to whatever
Kubernetes API, LiteLLM proxy and SMTP server they are configured with. These stand-ins speak
the documented HTTP/SMTP contracts so that the real clients can be exercised without a cluster
or a LiteLLM database.
"""
