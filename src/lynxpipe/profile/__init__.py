"""The profile stage of the data flow (SPEC §2, first arrow): `run` orchestrates (what to time,
whether it fits, where it runs), `measure` times the reference layer's ops on this device,
`comm` times collectives, p2p and contention on launched ranks (`launch`), `samples` holds the
measurements as plain data and `assemble` turns them into a measured CostTable. torch is
imported only by `measure`, `comm` and the ranks."""
