//! The backplane conformance suite against the in-memory bus.

switchboard_core::backplane_conformance_tests!(switchboard_core::testkit::MemoryBusHarness::new());
