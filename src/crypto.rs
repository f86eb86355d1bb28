//! Encryption at rest of provider credentials (SPEC §1.6): AES-256-GCM with a random 96-bit
//! nonce per encryption and associated data that binds the ciphertext to its row, so a
//! ciphertext copied to another merchant's row does not decrypt. A key id is stored next to
//! the ciphertext so keys can be rotated (old rows keep naming the key that sealed them).

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use rand::RngCore;

use crate::config::Secret;

/// Length of the random nonce stored with each ciphertext.
pub const NONCE_LEN: usize = 12;

/// Why a ciphertext could not be opened. Deliberately vague: which check failed is of no
/// use to an attacker and of little use to an operator beyond "wrong key or tampered".
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// The ciphertext names a key this process does not have.
    #[error("credentials were sealed with key `{key_id}`, which is not configured")]
    UnknownKey {
        /// The key id stored with the ciphertext.
        key_id: String,
    },
    /// Wrong key, wrong associated data, or tampered ciphertext or nonce.
    #[error("credentials could not be decrypted (wrong key, wrong row, or tampered data)")]
    Unsealable,
}

/// A sealed value as stored: key id, nonce and ciphertext (with its 16-byte tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Which key sealed it.
    pub key_id: String,
    /// The random nonce.
    pub nonce: Vec<u8>,
    /// Ciphertext followed by the GCM tag.
    pub ciphertext: Vec<u8>,
}

/// The keys of this process: one current key that seals, and older keys that only open.
#[derive(Clone)]
pub struct Keyring {
    current_id: String,
    current: Secret<[u8; 32]>,
    retired: Vec<(String, Secret<[u8; 32]>)>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let retired: Vec<&str> = self.retired.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("Keyring").field("current", &self.current_id).field("retired", &retired).finish()
    }
}

impl Keyring {
    /// A keyring whose current key is `key`. Its id is derived from the key itself (the first
    /// 8 hex digits of SHA-256 of it), so that operators need not name keys and a rotated
    /// key can never be mistaken for another.
    pub fn new(key: Secret<[u8; 32]>) -> Keyring {
        Keyring { current_id: key_id(&key), current: key, retired: Vec::new() }
    }

    /// Adds a retired key that can still open what it sealed.
    pub fn with_retired(mut self, key: Secret<[u8; 32]>) -> Keyring {
        let id = key_id(&key);
        if id != self.current_id && !self.retired.iter().any(|(k, _)| *k == id) {
            self.retired.push((id, key));
        }
        self
    }

    /// The id of the key that seals.
    pub fn current_key_id(&self) -> &str {
        &self.current_id
    }

    /// Seals `plaintext`, binding it to `aad` (e.g. `provider_config:{merchant}:{id}`).
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Sealed {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let cipher = Aes256Gcm::new(self.current.expose().into());
        // Encryption with a valid key and nonce length cannot fail; the error type exists
        // for buffer-backed APIs we do not use.
        let ciphertext =
            cipher.encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad }).unwrap_or_default();
        Sealed { key_id: self.current_id.clone(), nonce: nonce.to_vec(), ciphertext }
    }

    /// Opens a sealed value; fails if the key is unknown, the AAD differs or anything was
    /// altered.
    pub fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<Secret<Vec<u8>>, CryptoError> {
        let key = self
            .key(&sealed.key_id)
            .ok_or_else(|| CryptoError::UnknownKey { key_id: sealed.key_id.clone() })?;
        if sealed.nonce.len() != NONCE_LEN {
            return Err(CryptoError::Unsealable);
        }
        let cipher = Aes256Gcm::new(key.expose().into());
        cipher
            .decrypt(Nonce::from_slice(&sealed.nonce), Payload { msg: &sealed.ciphertext, aad })
            .map(Secret::new)
            .map_err(|_| CryptoError::Unsealable)
    }

    fn key(&self, id: &str) -> Option<&Secret<[u8; 32]>> {
        if id == self.current_id {
            return Some(&self.current);
        }
        self.retired.iter().find(|(k, _)| k == id).map(|(_, key)| key)
    }
}

fn key_id(key: &Secret<[u8; 32]>) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.expose());
    format!("k-{}", hex::encode(&digest[..4]))
}

/// A fresh random 32-byte key as 64 hex characters (`invoice keygen`).
pub fn generate_key_hex() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    hex::encode(key)
}

/// A fresh claim token: 256 random bits, URL-safe base64 without padding (43 characters).
pub fn random_token() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(byte: u8) -> Keyring {
        Keyring::new(Secret::new([byte; 32]))
    }

    #[test]
    fn sealed_values_open_with_the_same_key_and_aad() {
        let ring = ring(1);
        let sealed = ring.seal(b"{\"password\":\"p\"}", b"provider_config:M-1:7");
        assert_ne!(sealed.ciphertext, b"{\"password\":\"p\"}".to_vec());
        let opened = ring.open(&sealed, b"provider_config:M-1:7").unwrap();
        assert_eq!(opened.expose().as_slice(), b"{\"password\":\"p\"}");
    }

    #[test]
    fn every_seal_uses_a_fresh_nonce() {
        let ring = ring(1);
        let a = ring.seal(b"x", b"aad");
        let b = ring.seal(b"x", b"aad");
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn tampering_wrong_aad_and_wrong_key_are_refused() {
        let ring1 = ring(1);
        let sealed = ring1.seal(b"secret", b"row-1");
        assert_eq!(ring1.open(&sealed, b"row-2").unwrap_err(), CryptoError::Unsealable);
        let mut tampered = sealed.clone();
        tampered.ciphertext[0] ^= 1;
        assert_eq!(ring1.open(&tampered, b"row-1").unwrap_err(), CryptoError::Unsealable);
        let mut bad_nonce = sealed.clone();
        bad_nonce.nonce[0] ^= 1;
        assert_eq!(ring1.open(&bad_nonce, b"row-1").unwrap_err(), CryptoError::Unsealable);
        // A different key has a different id: reported as unknown, not as garbage.
        let ring2 = ring(2);
        assert!(matches!(ring2.open(&sealed, b"row-1"), Err(CryptoError::UnknownKey { .. })));
        // Same id forged onto another key still fails authentication.
        let mut forged = sealed;
        forged.key_id = ring2.current_key_id().to_owned();
        assert_eq!(ring2.open(&forged, b"row-1").unwrap_err(), CryptoError::Unsealable);
    }

    #[test]
    fn a_rotated_keyring_opens_old_values_and_seals_with_the_new_key() {
        let old = ring(1);
        let sealed_old = old.seal(b"old", b"aad");
        let rotated = ring(2).with_retired(Secret::new([1; 32]));
        assert_eq!(rotated.open(&sealed_old, b"aad").unwrap().expose().as_slice(), b"old");
        let sealed_new = rotated.seal(b"new", b"aad");
        assert_eq!(sealed_new.key_id, rotated.current_key_id());
        assert_ne!(sealed_new.key_id, sealed_old.key_id);
        assert!(old.open(&sealed_new, b"aad").is_err());
    }

    #[test]
    fn keys_print_masked_and_generated_keys_are_64_hex() {
        let shown = format!("{:?}", ring(0xab));
        assert!(!shown.contains("abab"), "{shown}");
        let key = generate_key_hex();
        assert_eq!(key.len(), 64);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(key, generate_key_hex());
    }

    proptest::proptest! {
        #[test]
        fn any_value_round_trips_and_any_flipped_byte_is_refused(
            plaintext in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            flip in proptest::prelude::any::<proptest::sample::Index>(),
            bit in 0u8..8,
        ) {
            let keyring = ring(7);
            let aad = b"provider_config:M-1:1";
            let sealed = keyring.seal(&plaintext, aad);
            let opened = keyring.open(&sealed, aad).unwrap();
            proptest::prop_assert_eq!(opened.expose(), &plaintext);
            let mut blob = sealed.nonce.clone();
            blob.extend_from_slice(&sealed.ciphertext);
            let at = flip.index(blob.len());
            blob[at] ^= 1 << bit;
            let tampered = Sealed { key_id: sealed.key_id.clone(), nonce: blob[..NONCE_LEN].to_vec(), ciphertext: blob[NONCE_LEN..].to_vec() };
            proptest::prop_assert_eq!(keyring.open(&tampered, aad).err(), Some(CryptoError::Unsealable));
            // Another row's AAD (a blob copied to another merchant or config) is refused.
            proptest::prop_assert!(keyring.open(&sealed, b"provider_config:M-2:1").is_err());
            proptest::prop_assert!(keyring.open(&sealed, b"provider_config:M-1:2").is_err());
        }

        #[test]
        fn arbitrary_stored_bytes_never_panic_the_opener(
            key_id in "\\PC{0,12}",
            nonce in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..32),
            ciphertext in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let keyring = ring(7);
            let key_id = if key_id.is_empty() { keyring.current_key_id().to_owned() } else { key_id };
            let stored = Sealed { key_id, nonce, ciphertext };
            proptest::prop_assert!(keyring.open(&stored, b"aad").is_err());
        }
    }
}
