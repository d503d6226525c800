"""The buyer-facing server: routing by path, the purchase flow from the sale window
to the backend's answer, the buyer's input, and the buyer's view of a reservation."""
