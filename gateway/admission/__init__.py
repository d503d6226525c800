"""Who is buying and whether they may try now: the buyer's identity (trusted header
or JWT), the client's address behind trusted proxies, and a campaign's edge limits
(sale window, token buckets, the stock-proportional admission budget)."""
