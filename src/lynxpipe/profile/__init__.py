"""The profile stage of the data flow: measure the reference layer's ops on this device
(`measure`), communication on launched ranks (`comm`), and the orchestration that turns a spec
into a measured profile.json (`run`). Imports torch only when measuring."""
