package callauth

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"time"

	"google.golang.org/grpc/metadata"
)

// The metadata entries of a session call, beside MDCaller, MDTimestamp and
// MDNonce (see the package documentation).
const (
	MDSession = "nitrosign-session-bin"
	MDMAC     = "nitrosign-mac-bin"
)

// SessionDomain is the first line of the MACed bytes of a session call,
// version 1; it differs from Domain, so the bytes a caller signs and the
// bytes a session MACs are never the same.
const SessionDomain = "nitrosign-session-call-v1"

// Sizes of the session's parts.
const (
	// ShareLen is an X25519 public key's length.
	ShareLen = 32
	// SessionKeyLen is the session key's length (HMAC-SHA256).
	SessionKeyLen = 32
	// MACLen is the length of a call's MAC: HMAC-SHA256.
	MACLen = sha256.Size
	// TicketLen is a ticket's length: version, GCM nonce, the sealed
	// (caller, expiry, session key) and the GCM tag.
	TicketLen = 1 + ticketNonceLen + ticketPlainLen + ticketTagLen
	// TicketKeyLen is the length of the key tickets are sealed with.
	TicketKeyLen = 32

	ticketVersion  = 1
	ticketNonceLen = 12
	ticketTagLen   = 16
	ticketPlainLen = sha256.Size + 8 + SessionKeyLen
)

// DefaultSessionLifetime is how long the enclave accepts a ticket.
const DefaultSessionLifetime = time.Hour

// ticketAD is the ticket's associated data: a key used for other
// purposes never opens a ticket.
var ticketAD = []byte("nitrosign-ticket-v1")

// sessionKeyInfo begins the HKDF info of a session key.
const sessionKeyInfo = "nitrosign-session-key-v1"

// ErrSessionInvalid is wrapped when a session call's ticket is not one
// the enclave accepts: sealed by an enclave with another keyset (or an
// earlier run of an ephemeral one), expired, or damaged. The caller
// opens a new session; nothing was done for the call.
var ErrSessionInvalid = errors.New("callauth: session not valid")

// TicketSealer seals and opens session tickets with a key that only the
// enclaves of one keyset hold (the signer derives it from the keyset).
type TicketSealer struct {
	aead cipher.AEAD
}

// NewTicketSealer returns a sealer for a key of TicketKeyLen bytes.
func NewTicketSealer(key []byte) (*TicketSealer, error) {
	if len(key) != TicketKeyLen {
		return nil, fmt.Errorf("callauth: ticket key of %d bytes (want %d)", len(key), TicketKeyLen)
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(b)
	if err != nil {
		return nil, err
	}
	return &TicketSealer{aead: aead}, nil
}

// seal makes a ticket of caller (a key id), its expiry and the session
// key.
func (t *TicketSealer) seal(caller string, expiryMs int64, key *[SessionKeyLen]byte) ([]byte, error) {
	var plain [ticketPlainLen]byte
	if _, err := hex.Decode(plain[:sha256.Size], []byte(caller)); err != nil || len(caller) != CallerIDLen {
		return nil, fmt.Errorf("%w: caller %q is not a key id", ErrInvalidInput, caller)
	}
	binary.BigEndian.PutUint64(plain[sha256.Size:], uint64(expiryMs))
	copy(plain[sha256.Size+8:], key[:])
	out := make([]byte, 1+ticketNonceLen, TicketLen)
	out[0] = ticketVersion
	if _, err := rand.Read(out[1:]); err != nil {
		return nil, fmt.Errorf("callauth: ticket nonce: %w", err)
	}
	out = t.aead.Seal(out, out[1:1+ticketNonceLen], plain[:], ticketAD)
	clear(plain[:])
	return out, nil
}

// ticket is an opened ticket.
type ticket struct {
	caller   [sha256.Size]byte
	expiryMs int64
	key      [SessionKeyLen]byte
}

// open opens a ticket; any failure wraps ErrSessionInvalid.
func (t *TicketSealer) open(b []byte, tk *ticket) error {
	if len(b) != TicketLen || b[0] != ticketVersion {
		return fmt.Errorf("%w: not a ticket of this format", ErrSessionInvalid)
	}
	var plain [ticketPlainLen]byte
	if _, err := t.aead.Open(plain[:0], b[1:1+ticketNonceLen], b[1+ticketNonceLen:], ticketAD); err != nil {
		return fmt.Errorf("%w: the ticket was not issued by an enclave with these keys (another keyset, an earlier run of an enclave with ephemeral keys) or was altered", ErrSessionInvalid)
	}
	copy(tk.caller[:], plain[:sha256.Size])
	tk.expiryMs = int64(binary.BigEndian.Uint64(plain[sha256.Size:]))
	copy(tk.key[:], plain[sha256.Size+8:])
	clear(plain[:])
	return nil
}

// deriveSessionKey is HKDF-SHA256 of the X25519 shared secret, salted
// with both shares, with info naming the caller and the expiry: the two
// sides agree on all of them or on no key.
func deriveSessionKey(shared, clientShare, enclaveShare []byte, caller string, expiryMs int64) (*[SessionKeyLen]byte, error) {
	salt := make([]byte, 0, 2*ShareLen)
	salt = append(append(salt, clientShare...), enclaveShare...)
	info := sessionKeyInfo + "\n" + caller + "\n" + strconv.FormatInt(expiryMs, 10)
	k, err := hkdf.Key(sha256.New, shared, salt, info, SessionKeyLen)
	if err != nil {
		return nil, err
	}
	var out [SessionKeyLen]byte
	copy(out[:], k)
	clear(k)
	return &out, nil
}

// AcceptSession is the enclave's half of OpenSession, for caller (a key
// id whose signed OpenSession call was verified): it makes an ephemeral
// X25519 key, derives the session key from clientShare, and seals it in a
// ticket that expires lifetime after now. It returns the enclave's share,
// the ticket and the expiry (to the millisecond).
func AcceptSession(t *TicketSealer, caller string, clientShare []byte, now time.Time, lifetime time.Duration) (enclaveShare, tk []byte, expiry time.Time, err error) {
	peer, err := ecdh.X25519().NewPublicKey(clientShare)
	if err != nil {
		return nil, nil, time.Time{}, fmt.Errorf("%w: client_share: %d bytes, want an X25519 public key of %d", ErrInvalidInput, len(clientShare), ShareLen)
	}
	priv, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return nil, nil, time.Time{}, err
	}
	shared, err := priv.ECDH(peer)
	if err != nil {
		// The all-zero shared secret of a low-order point.
		return nil, nil, time.Time{}, fmt.Errorf("%w: client_share: %v", ErrInvalidInput, err)
	}
	defer clear(shared)
	enclaveShare = priv.PublicKey().Bytes()
	expiryMs := now.Add(lifetime).UnixMilli()
	key, err := deriveSessionKey(shared, clientShare, enclaveShare, caller, expiryMs)
	if err != nil {
		return nil, nil, time.Time{}, err
	}
	defer clear(key[:])
	if tk, err = t.seal(caller, expiryMs, key); err != nil {
		return nil, nil, time.Time{}, err
	}
	return enclaveShare, tk, time.UnixMilli(expiryMs), nil
}

// SessionOffer is the caller's half of a session being opened: its
// ephemeral X25519 key.
type SessionOffer struct {
	priv *ecdh.PrivateKey
}

// NewSessionOffer makes a fresh ephemeral X25519 key.
func NewSessionOffer() (*SessionOffer, error) {
	priv, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	return &SessionOffer{priv: priv}, nil
}

// Share is the public key to send as OpenSessionRequest.client_share.
func (o *SessionOffer) Share() []byte { return o.priv.PublicKey().Bytes() }

// Finish derives the session of caller from the enclave's answer.
func (o *SessionOffer) Finish(caller string, enclaveShare, tk []byte, expiry time.Time) (*Session, error) {
	if len(tk) != TicketLen {
		return nil, fmt.Errorf("callauth: the enclave's ticket is %d bytes, want %d", len(tk), TicketLen)
	}
	peer, err := ecdh.X25519().NewPublicKey(enclaveShare)
	if err != nil {
		return nil, fmt.Errorf("callauth: the enclave's share is %d bytes, want an X25519 public key of %d", len(enclaveShare), ShareLen)
	}
	shared, err := o.priv.ECDH(peer)
	if err != nil {
		return nil, fmt.Errorf("callauth: the enclave's share: %w", err)
	}
	defer clear(shared)
	key, err := deriveSessionKey(shared, o.Share(), enclaveShare, caller, expiry.UnixMilli())
	if err != nil {
		return nil, err
	}
	return &Session{caller: caller, key: *key, ticket: append([]byte(nil), tk...), expiry: expiry}, nil
}

// Session is an open session of one caller: the key that MACs its calls
// and the ticket that carries that key, sealed, to the enclave. It is safe
// for concurrent use.
type Session struct {
	caller string
	key    [SessionKeyLen]byte
	ticket []byte
	expiry time.Time
}

// Expiry is when the enclave stops accepting the session (its clock).
func (s *Session) Expiry() time.Time { return s.expiry }

// Authenticate authenticates a call of method whose request message bytes
// are msg, at time now, with a fresh random nonce, and returns the five
// metadata entries to send with it (MDCaller, MDTimestamp, MDNonce,
// MDSession, MDMAC).
func (s *Session) Authenticate(method string, msg []byte, now time.Time) (metadata.MD, error) {
	var raw [NonceLen / 2]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return nil, fmt.Errorf("callauth: nonce: %w", err)
	}
	nonce := hex.EncodeToString(raw[:])
	ts := now.UnixMilli()
	if err := checkFields(method, s.caller, ts, nonce); err != nil {
		return nil, err
	}
	sum := sha256.Sum256(msg)
	mac := s.mac(method, &sum, ts, nonce)
	return metadata.MD{
		MDCaller:    {s.caller},
		MDTimestamp: {strconv.FormatInt(ts, 10)},
		MDNonce:     {nonce},
		MDSession:   {string(s.ticket)},
		MDMAC:       {string(mac[:])},
	}, nil
}

func (s *Session) mac(method string, msgSHA256 *[sha256.Size]byte, ts int64, nonce string) [MACLen]byte {
	return sessionMAC(&s.key, method, msgSHA256, s.caller, ts, nonce)
}

// sessionMAC is HMAC-SHA256 under key of the MACed bytes: the signed
// bytes of the call with SessionDomain as their first line.
func sessionMAC(key *[SessionKeyLen]byte, method string, msgSHA256 *[sha256.Size]byte, caller string, ts int64, nonce string) [MACLen]byte {
	var buf [signedLen + len(SessionDomain) - len(Domain)]byte
	h := hmac.New(sha256.New, key[:])
	h.Write(appendCanonical(buf[:0], SessionDomain, method, msgSHA256, caller, ts, nonce))
	var out [MACLen]byte
	h.Sum(out[:0])
	return out
}

// MACedBytes returns the bytes a session call's MAC covers (see the
// package documentation), for other implementations and tests.
func MACedBytes(method string, msg []byte, caller string, timestampMs int64, nonce string) ([]byte, error) {
	if err := checkFields(method, caller, timestampMs, nonce); err != nil {
		return nil, err
	}
	sum := sha256.Sum256(msg)
	return appendCanonical(nil, SessionDomain, method, &sum, caller, timestampMs, nonce), nil
}

// VerifySession checks a session call: its ticket opens with t (else
// ErrSessionInvalid), was issued to the caller the claims name, has not
// expired at now (else ErrSessionInvalid), and its MAC is that of a call
// of method whose request message bytes hash to msgSHA256 (else
// ErrBadSignature). It does not check the time or the nonce:
// ReplayCache.Check does, after it.
func (c *Claims) VerifySession(t *TicketSealer, method string, msgSHA256 [sha256.Size]byte, now time.Time) error {
	if c == nil || !c.session {
		return fmt.Errorf("%w: not a session call", ErrBadSignature)
	}
	if t == nil {
		return fmt.Errorf("%w: the enclave has no ticket key (no keys yet)", ErrSessionInvalid)
	}
	var tk ticket
	defer clear(tk.key[:])
	if err := t.open(c.ticket[:c.ticketLen], &tk); err != nil {
		return err
	}
	var caller [CallerIDLen]byte
	hex.Encode(caller[:], tk.caller[:])
	if string(caller[:]) != c.caller {
		return fmt.Errorf("%w: the session was opened by caller %s, the call names %s", ErrBadSignature, caller[:], c.caller)
	}
	if now.UnixMilli() >= tk.expiryMs {
		return fmt.Errorf("%w: the session expired at %s", ErrSessionInvalid, time.UnixMilli(tk.expiryMs).UTC().Format(time.RFC3339))
	}
	if err := checkMethod(method); err != nil {
		return fmt.Errorf("%w: %v", ErrBadSignature, err)
	}
	want := sessionMAC(&tk.key, method, &msgSHA256, c.caller, c.ts, c.nonce)
	if !hmac.Equal(want[:], c.sig[:c.sigLen]) {
		return fmt.Errorf("%w: caller %s, %s: the session MAC does not match", ErrBadSignature, c.caller, method)
	}
	return nil
}
