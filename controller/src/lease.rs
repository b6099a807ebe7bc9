//! A lease in Redis for singleton work (the intent publisher, retention): one replica holds it,
//! renews it well within its TTL, and if that replica dies another acquires it once the TTL
//! runs out. Acquire-or-renew and release are single atomic scripts, so a replica can never
//! extend or drop a lease another replica holds.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;

/// One named lease, as seen by one replica.
#[derive(Clone, Debug)]
pub struct Lease {
    key: String,
    holder: String,
    ttl: Duration,
}

const ACQUIRE_OR_RENEW: &str = r"
local current = redis.call('GET', KEYS[1])
if current == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

impl Lease {
    pub fn new(name: &str, holder: &str, ttl: Duration) -> Self {
        Self {
            key: format!("patronus:lease:{name}"),
            holder: holder.to_owned(),
            ttl,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Take the lease if free, or extend it if we hold it. True if we hold it now.
    pub async fn acquire_or_renew(
        &self,
        redis: &mut ConnectionManager,
    ) -> redis::RedisResult<bool> {
        let held: i32 = Script::new(ACQUIRE_OR_RENEW)
            .key(&self.key)
            .arg(&self.holder)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(redis)
            .await?;
        Ok(held == 1)
    }

    /// Give the lease up if we hold it (on shutdown), so another replica need not wait.
    pub async fn release(&self, redis: &mut ConnectionManager) -> redis::RedisResult<()> {
        let _: i32 = Script::new(RELEASE)
            .key(&self.key)
            .arg(&self.holder)
            .invoke_async(redis)
            .await?;
        Ok(())
    }
}
