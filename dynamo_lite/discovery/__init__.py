"""Service discovery: leases, instance records, model cards. etcd in production, memory in unit tests."""
