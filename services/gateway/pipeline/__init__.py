"""What a request goes through between its route and the backends: sampling parameters, chat tools and
structured output turned into a generation request, the Engine that tokenizes it, sends it to a scheduler
(chosen by the data-parallel router) over the Session stream and decodes the tokens back to text, the
fan-out of n choices, and ending requests from outside (abort, --request-timeout)."""
