"""WorkBinder's wire protocol (`wire`) and the lab's asyncio client (`client`)."""
