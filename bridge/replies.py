"""Every reply the bridge sends, in one table, so code and tests share the wording.

Codes follow RFC 5321 and RFC 2645 (ODMR); enhanced status codes RFC 3463.
"""

from __future__ import annotations

# --- shared -------------------------------------------------------------
OK = "250 2.0.0 OK"
BYE = "221 2.0.0 Bye"
SYNTAX_ERROR = "500 5.5.2 Error: bad syntax"
NOT_IMPLEMENTED = "502 5.5.1 Error: command not implemented"

# --- LMTP intake (RFC 2033) ---------------------------------------------
RCPT_OK = "250 2.1.5 OK"
RCPT_NOT_ATRN_DOMAIN = "450 4.1.2 <{rcpt}>: Recipient domain is not an ATRN domain here"
RCPT_BAD_ADDRESS = "501 5.1.3 <{rcpt}>: Bad recipient address syntax"
QUEUED = "250 2.0.0 <{rcpt}> OK: queued as {qid}"
LOCAL_ERROR = "451 4.3.0 <{rcpt}> Error: queue file write error, try again later"
STORAGE_FULL = "452 4.3.1 <{rcpt}> Error: insufficient system storage, try again later"
MESSAGE_TOO_BIG = "552 5.3.4 Error: message too big"
DATA_LINE_TOO_LONG = "500 5.5.6 Error: message line longer than 1000 octets (RFC 5321 4.5.3.1.6)"

# --- ODMR, before reversal (RFC 2645) -----------------------------------
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
AUTH_ALREADY = "503 5.5.1 Error: already authenticated"
AUTH_UNKNOWN_MECHANISM = "504 5.5.4 Unrecognized authentication type"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
AUTH_ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_THROTTLED = "454 4.7.0 Too many authentication failures, try again later"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode base64"
AUTH_SYNTAX = "501 5.5.4 Syntax error in authentication exchange"
TLS_REQUIRED = "530 5.7.0 Must issue a STARTTLS command first"
TLS_ALREADY = "503 5.5.1 Error: TLS already active"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
TOO_MANY_CONNECTIONS = "421 4.7.0 Error: too many connections from your address, try again later"
LINE_TOO_LONG = "500 5.5.6 Error: command line too long"
UNRECOGNIZED = "500 5.5.2 Error: command not recognized"
EHLO_FIRST = "503 5.5.1 Error: send EHLO first"
ATRN_REVERSING = "250 2.0.0 OK now reversing the connection"
ATRN_REFUSED = "450 4.7.1 ATRN request refused"
ATRN_BUSY = "451 4.4.0 Unable to process ATRN request now"
ATRN_NO_MAIL = "453 4.7.0 You have no mail"
ATRN_BAD_DOMAIN = "501 5.5.4 Syntax: ATRN [domain{,domain}]"
ODMR_COMMAND_REFUSED = "502 5.5.1 Error: command not available before ATRN"
